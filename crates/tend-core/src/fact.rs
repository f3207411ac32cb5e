//! Signed facts, their canonical wire encoding, and `VerifiedFact`, the only form the rest
//! of tend accepts.
//!
//! Wire forms (DAG-CBOR arrays):
//! - format 1: `[1, namespace, epoch, author, payload_tag, payload_body, signature]`;
//! - format 2: `[2, time_ms, namespace, epoch, author, payload_tag, payload_body, signature]`,
//!   the same with its author's clock, which orders it among recent facts (see
//!   [`FactId::of`]);
//! - format 3: `[3, time_ms, ...]`, format 2's layout, whose signature is checked by the
//!   ZIP-215 rules instead of `verify_strict`, so that a batch of them verifies at once and
//!   accepts exactly what one check per fact accepts ([`FactFormat`]).
//!
//! The payload body is a byte string holding the canonical encoding of the payload, so a
//! payload whose tag this release does not know is stored and forwarded byte for byte.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{de, Deserialize, Deserializer};
use serde_bytes::{ByteBuf, Bytes};

use crate::authority::{AuthorityFact, AuthorityGenesis, MembershipChange};
use crate::data::DataOp;
use crate::encoding::{from_canonical, to_canonical};
use crate::error::DecodeError;
use crate::ids::{DeviceId, Epoch, FactId, JournalNamespace};
use crate::maintenance::*;

/// The original fact format, without a time. Every release reads it; a device writes it
/// until every member reads [`TIMED_FACT_FORMAT`] (and for facts that need no time).
pub const FACT_FORMAT_VERSION: u64 = 1;
/// The fact format that carries its author's clock, from release 1.0.1 on
/// ([`TIMED_FACTS_SINCE`]).
pub const TIMED_FACT_FORMAT: u64 = 2;
/// The first release that reads [`TIMED_FACT_FORMAT`]: a device writes timed facts only when
/// every member announced at least this version (`MaintenanceState::write_format`).
pub const TIMED_FACTS_SINCE: crate::ids::ProtocolVersion = crate::ids::ProtocolVersion {
    major: 1,
    minor: 0,
    patch: 1,
};
/// The fact format whose signatures follow the ZIP-215 rules, from release 1.0.2 on
/// ([`ZIP215_FACTS_SINCE`]).
pub const ZIP215_FACT_FORMAT: u64 = 3;
/// The first release that reads [`ZIP215_FACT_FORMAT`].
pub const ZIP215_FACTS_SINCE: crate::ids::ProtocolVersion = crate::ids::ProtocolVersion {
    major: 1,
    minor: 0,
    patch: 2,
};
/// Facts larger than this are rejected before decoding.
pub const MAX_FACT_BYTES: usize = 64 * 1024;

const SIGNING_DOMAIN: &[u8] = b"tend-fact-v1";
const TIMED_SIGNING_DOMAIN: &[u8] = b"tend-fact-v2";
const ZIP215_SIGNING_DOMAIN: &[u8] = b"tend-fact-v3";

/// A fact's format: its wire layout, the domain its author signs under, and the rule its
/// signature is checked by. Every release that reads a format checks it by the same rule,
/// since devices that disagreed on validity would diverge.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum FactFormat {
    /// Format 1: no time; Ed25519 checked with `verify_strict`.
    Untimed,
    /// Format 2: the author's clock in ms since the Unix epoch; `verify_strict`.
    Timed { time_ms: u64 },
    /// Format 3: format 2's layout, checked by the ZIP-215 rules (cofactored, as
    /// `ed25519-zebra` implements them), under which one check per fact and a batch check
    /// accept exactly the same signatures, plus one rule of tend's: the author's key is not
    /// of small order.
    TimedZip215 { time_ms: u64 },
}

impl FactFormat {
    /// The format number, the first element of the wire form.
    pub fn version(self) -> u64 {
        match self {
            Self::Untimed => FACT_FORMAT_VERSION,
            Self::Timed { .. } => TIMED_FACT_FORMAT,
            Self::TimedZip215 { .. } => ZIP215_FACT_FORMAT,
        }
    }

    /// The author's clock, for the timed formats.
    pub fn time_ms(self) -> Option<u64> {
        match self {
            Self::Untimed => None,
            Self::Timed { time_ms } | Self::TimedZip215 { time_ms } => Some(time_ms),
        }
    }

    /// The format of `version` with the clock `time_ms` (ignored by format 1), or `None`
    /// for a version this release does not read.
    pub fn from_version(version: u64, time_ms: u64) -> Option<Self> {
        match version {
            FACT_FORMAT_VERSION => Some(Self::Untimed),
            TIMED_FACT_FORMAT => Some(Self::Timed { time_ms }),
            ZIP215_FACT_FORMAT => Some(Self::TimedZip215 { time_ms }),
            _ => None,
        }
    }

    /// The newest format that a release of `oldest_member` reads, stamped with `time_ms`
    /// when it carries a time: what a device writes when `oldest_member` is the oldest
    /// release any member announced.
    pub fn newest_readable_by(oldest_member: crate::ids::ProtocolVersion, time_ms: u64) -> Self {
        if oldest_member >= ZIP215_FACTS_SINCE {
            Self::TimedZip215 { time_ms }
        } else if oldest_member >= TIMED_FACTS_SINCE {
            Self::Timed { time_ms }
        } else {
            Self::Untimed
        }
    }

    fn signing_domain(self) -> &'static [u8] {
        match self {
            Self::Untimed => SIGNING_DOMAIN,
            Self::Timed { .. } => TIMED_SIGNING_DOMAIN,
            Self::TimedZip215 { .. } => ZIP215_SIGNING_DOMAIN,
        }
    }
}

/// What a fact says.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Payload {
    Maintenance(MaintenanceFact),
    Authority(AuthorityFact),
    /// Application data; tend never interprets it.
    Application {
        kind: String,
        data: Vec<u8>,
    },
    /// Collections, log trims and the replicated cache (`crate::app`).
    Data(DataOp),
    /// A kind from a newer release: kept, hashed and forwarded unchanged.
    Unknown {
        tag: u64,
        raw: Vec<u8>,
    },
}

mod tag {
    pub const APPLICATION: u64 = 1;
    pub const PUT: u64 = 2;
    pub const DELETE: u64 = 3;
    pub const TRIM: u64 = 4;
    pub const CACHE_PUT: u64 = 5;
    pub const APPEND: u64 = 6;
    pub const SNAPSHOT_PROPOSED: u64 = 16;
    pub const SNAPSHOT_COMPLETED: u64 = 17;
    pub const CACHE_INVALIDATED: u64 = 18;
    pub const UPGRADE_PUBLISHED: u64 = 19;
    pub const DEVICE_METADATA: u64 = 20;
    pub const UPGRADE_READY: u64 = 21;
    pub const UPGRADE_ACTIVATED: u64 = 22;
    pub const ADMIN_REPLACEMENT: u64 = 23;
    pub const BLOB_TOMBSTONE: u64 = 24;
    pub const CERTIFIED_ADMIN_REPLACEMENT: u64 = 25;
    pub const UPGRADE_WIDENED: u64 = 26;
    pub const UPGRADE_ACTIVATED_WHEN_READY: u64 = 27;
    pub const VAULT_EPOCH_KEY: u64 = 28;
    pub const VAULT_REKEY: u64 = 29;
    pub const STORAGE_GRANT: u64 = 30;
    pub const VAULT_COPY: u64 = 31;
    pub const AUTHORITY_GENESIS: u64 = 32;
    pub const MEMBERSHIP_CHANGED: u64 = 33;
    pub const SNAPSHOT_SETTLED: u64 = 34;
}

impl Payload {
    /// The payload's tag and the canonical encoding of its body.
    pub fn to_tag_body(&self) -> (u64, Vec<u8>) {
        use MaintenanceFact as M;
        match self {
            Payload::Application { kind, data } => {
                (tag::APPLICATION, to_canonical(&(kind, Bytes::new(data))))
            }
            Payload::Unknown { tag, raw } => (*tag, raw.clone()),
            Payload::Data(d) => match d {
                DataOp::Put(x) => (tag::PUT, to_canonical(x)),
                DataOp::Delete(x) => (tag::DELETE, to_canonical(x)),
                DataOp::Trim(x) => (tag::TRIM, to_canonical(x)),
                DataOp::CachePut(x) => (tag::CACHE_PUT, to_canonical(x)),
                DataOp::Append(x) => (tag::APPEND, to_canonical(x)),
            },
            Payload::Authority(AuthorityFact::Genesis(g)) => {
                (tag::AUTHORITY_GENESIS, to_canonical(g))
            }
            Payload::Authority(AuthorityFact::MembershipChanged(m)) => {
                (tag::MEMBERSHIP_CHANGED, to_canonical(m))
            }
            Payload::Maintenance(m) => match m {
                M::SnapshotProposed(x) => (tag::SNAPSHOT_PROPOSED, to_canonical(x)),
                M::SnapshotCompleted(x) => (tag::SNAPSHOT_COMPLETED, to_canonical(x)),
                M::CacheInvalidated(x) => (tag::CACHE_INVALIDATED, to_canonical(x)),
                M::UpgradePublished(x) => (tag::UPGRADE_PUBLISHED, to_canonical(x)),
                M::DeviceMetadata(x) => (tag::DEVICE_METADATA, to_canonical(x)),
                M::UpgradeReady(x) => (tag::UPGRADE_READY, to_canonical(x)),
                M::UpgradeActivated(x) => (tag::UPGRADE_ACTIVATED, to_canonical(x)),
                M::AdminReplacement(x) => (tag::ADMIN_REPLACEMENT, to_canonical(x)),
                M::BlobTombstone(x) => (tag::BLOB_TOMBSTONE, to_canonical(x)),
                M::CertifiedAdminReplacement(x) => {
                    (tag::CERTIFIED_ADMIN_REPLACEMENT, to_canonical(x))
                }
                M::UpgradeWidened(x) => (tag::UPGRADE_WIDENED, to_canonical(x)),
                M::UpgradeActivatedWhenReady(x) => {
                    (tag::UPGRADE_ACTIVATED_WHEN_READY, to_canonical(x))
                }
                M::VaultEpochKey(x) => (tag::VAULT_EPOCH_KEY, to_canonical(x)),
                M::VaultRekey(x) => (tag::VAULT_REKEY, to_canonical(x)),
                M::StorageGrant(x) => (tag::STORAGE_GRANT, to_canonical(x)),
                M::VaultCopy(x) => (tag::VAULT_COPY, to_canonical(x)),
                M::SnapshotSettled(x) => (tag::SNAPSHOT_SETTLED, to_canonical(x)),
            },
        }
    }

    /// Decodes a body under its tag; unknown tags are kept as they are.
    pub fn from_tag_body(t: u64, body: &[u8]) -> Result<Payload, DecodeError> {
        use MaintenanceFact as M;
        let m = |m: MaintenanceFact| Payload::Maintenance(m);
        Ok(match t {
            tag::APPLICATION => {
                let (kind, data): (String, ByteBuf) = from_canonical(body)?;
                Payload::Application {
                    kind,
                    data: data.into_vec(),
                }
            }
            tag::PUT => Payload::Data(DataOp::Put(from_canonical(body)?)),
            tag::DELETE => Payload::Data(DataOp::Delete(from_canonical(body)?)),
            tag::TRIM => Payload::Data(DataOp::Trim(from_canonical(body)?)),
            tag::CACHE_PUT => Payload::Data(DataOp::CachePut(from_canonical(body)?)),
            tag::APPEND => Payload::Data(DataOp::Append(from_canonical(body)?)),
            tag::SNAPSHOT_PROPOSED => m(M::SnapshotProposed(from_canonical(body)?)),
            tag::SNAPSHOT_COMPLETED => m(M::SnapshotCompleted(from_canonical(body)?)),
            tag::CACHE_INVALIDATED => m(M::CacheInvalidated(from_canonical(body)?)),
            tag::UPGRADE_PUBLISHED => m(M::UpgradePublished(from_canonical(body)?)),
            tag::DEVICE_METADATA => m(M::DeviceMetadata(from_canonical(body)?)),
            tag::UPGRADE_READY => m(M::UpgradeReady(from_canonical(body)?)),
            tag::UPGRADE_ACTIVATED => m(M::UpgradeActivated(from_canonical(body)?)),
            tag::ADMIN_REPLACEMENT => m(M::AdminReplacement(from_canonical(body)?)),
            tag::BLOB_TOMBSTONE => m(M::BlobTombstone(from_canonical(body)?)),
            tag::CERTIFIED_ADMIN_REPLACEMENT => {
                m(M::CertifiedAdminReplacement(from_canonical(body)?))
            }
            tag::UPGRADE_WIDENED => m(M::UpgradeWidened(from_canonical(body)?)),
            tag::UPGRADE_ACTIVATED_WHEN_READY => {
                m(M::UpgradeActivatedWhenReady(from_canonical(body)?))
            }
            tag::VAULT_EPOCH_KEY => m(M::VaultEpochKey(from_canonical(body)?)),
            tag::VAULT_REKEY => m(M::VaultRekey(from_canonical(body)?)),
            tag::STORAGE_GRANT => m(M::StorageGrant(from_canonical(body)?)),
            tag::VAULT_COPY => m(M::VaultCopy(from_canonical(body)?)),
            tag::SNAPSHOT_SETTLED => m(M::SnapshotSettled(from_canonical(body)?)),
            tag::AUTHORITY_GENESIS => {
                Payload::Authority(AuthorityFact::Genesis(from_canonical::<AuthorityGenesis>(
                    body,
                )?))
            }
            tag::MEMBERSHIP_CHANGED => {
                Payload::Authority(AuthorityFact::MembershipChanged(from_canonical::<
                    MembershipChange,
                >(body)?))
            }
            other => Payload::Unknown {
                tag: other,
                raw: body.to_vec(),
            },
        })
    }

    /// Whether the author re-issues this payload at its current epoch when it lands below a
    /// snapshot that does not cover it (DESIGN rule 5): application data, and the
    /// maintenance facts that state a standing condition of their author (a cache floor,
    /// its metadata, its readiness for an upgrade). Proposals, completions and admin
    /// operations belong to their moment and lapse instead.
    pub fn is_reissuable(&self) -> bool {
        use MaintenanceFact as M;
        matches!(
            self,
            Payload::Application { .. }
                | Payload::Data(_)
                | Payload::Maintenance(
                    M::DeviceMetadata(_) | M::UpgradeReady(_) | M::CacheInvalidated(_)
                )
        )
    }

    /// A short name of the payload kind, for listings.
    pub fn kind_name(&self) -> String {
        use MaintenanceFact as M;
        match self {
            Payload::Application { kind, .. } => format!("app:{kind}"),
            Payload::Unknown { tag, .. } => format!("unknown:{tag}"),
            Payload::Data(DataOp::Put(p)) => format!("put:{}", p.collection),
            Payload::Data(DataOp::Delete(d)) => format!("delete:{}", d.collection),
            Payload::Data(DataOp::Trim(t)) => format!("trim:{}", t.log),
            Payload::Data(DataOp::CachePut(_)) => "cache-put".into(),
            Payload::Data(DataOp::Append(a)) => format!("app:{}", a.log),
            Payload::Authority(AuthorityFact::Genesis(_)) => "authority-genesis".into(),
            Payload::Authority(AuthorityFact::MembershipChanged(_)) => "membership-changed".into(),
            Payload::Maintenance(m) => match m {
                M::SnapshotProposed(_) => "snapshot-proposed",
                M::SnapshotCompleted(_) => "snapshot-completed",
                M::CacheInvalidated(_) => "cache-invalidated",
                M::UpgradePublished(_) => "upgrade-published",
                M::DeviceMetadata(_) => "device-metadata",
                M::UpgradeReady(_) => "upgrade-ready",
                M::UpgradeActivated(_) => "upgrade-activated",
                M::AdminReplacement(_) => "admin-replacement",
                M::BlobTombstone(_) => "blob-tombstone",
                M::CertifiedAdminReplacement(_) => "admin-replacement-certified",
                M::UpgradeWidened(_) => "upgrade-widened",
                M::UpgradeActivatedWhenReady(_) => "upgrade-activated-when-ready",
                M::VaultEpochKey(_) => "vault-epoch-key",
                M::VaultRekey(_) => "vault-rekey",
                M::StorageGrant(_) => "storage-grant",
                M::VaultCopy(_) => "vault-copy",
                M::SnapshotSettled(_) => "snapshot-settled",
            }
            .into(),
        }
    }
}

/// A fact before its author signs it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct UnsignedFact {
    pub namespace: JournalNamespace,
    pub epoch: Epoch,
    pub payload: Payload,
}

impl UnsignedFact {
    /// Signs the fact with the author's device key.
    ///
    /// ```
    /// use tend_core::{UnsignedFact, Payload, JournalNamespace, ContextId, Epoch};
    /// let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    /// let fact = UnsignedFact {
    ///     namespace: JournalNamespace::Context(ContextId([0; 32])),
    ///     epoch: Epoch(1),
    ///     payload: Payload::Application { kind: "note".into(), data: b"hi".to_vec() },
    /// }
    /// .sign(&key);
    /// assert_eq!(tend_core::VerifiedFact::decode(fact.bytes()).unwrap().id(), fact.id());
    /// ```
    pub fn sign(self, key: &SigningKey) -> VerifiedFact {
        self.sign_with(key, FactFormat::Untimed)
    }

    /// Signs the fact in the timed format (2), stamped with `time_ms`, the author's clock in
    /// milliseconds since the Unix epoch. Its id then starts with that time, so facts
    /// written about the same time sit together in sync order ([`FactId::of`]). Only for a
    /// journal whose members all read format 2 (`MaintenanceState::write_format`): older
    /// releases refuse it.
    ///
    /// ```
    /// use tend_core::{UnsignedFact, Payload, JournalNamespace, ContextId, Epoch};
    /// let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    /// let note = |text: &[u8]| UnsignedFact {
    ///     namespace: JournalNamespace::Context(ContextId([0; 32])),
    ///     epoch: Epoch(1),
    ///     payload: Payload::Application { kind: "note".into(), data: text.to_vec() },
    /// };
    /// let earlier = note(b"b").sign_timed(&key, 1_000);
    /// let later = note(b"a").sign_timed(&key, 2_000);
    /// assert!(earlier.id() < later.id());
    /// assert_eq!(tend_core::VerifiedFact::decode(later.bytes()).unwrap().time_ms(), Some(2_000));
    /// ```
    pub fn sign_timed(self, key: &SigningKey, time_ms: u64) -> VerifiedFact {
        self.sign_with(key, FactFormat::Timed { time_ms })
    }

    /// Signs the fact in `format`: for a writer that decides per batch which format every
    /// member reads (`MaintenanceState::write_format`).
    pub fn sign_with(self, key: &SigningKey, format: FactFormat) -> VerifiedFact {
        let author = DeviceId(key.verifying_key().to_bytes());
        let (tag, body) = self.payload.to_tag_body();
        let msg = signing_message(&self.namespace, self.epoch, &author, format, tag, &body);
        let signature = key.sign(&msg).to_bytes();
        let (ns, body, sig) = (&self.namespace, Bytes::new(&body), Bytes::new(&signature));
        let bytes = match format.time_ms() {
            None => to_canonical(&(FACT_FORMAT_VERSION, ns, self.epoch, &author, tag, body, sig)),
            Some(t) => {
                to_canonical(&(format.version(), t, ns, self.epoch, &author, tag, body, sig))
            }
        };
        let fact = Fact {
            namespace: self.namespace,
            epoch: self.epoch,
            author,
            format,
            payload: self.payload,
            signature,
        };
        VerifiedFact::from_parts(fact, bytes)
    }
}

/// What the author signs: a domain separator per format, then the fact without its signature.
fn signing_message(
    ns: &JournalNamespace,
    epoch: Epoch,
    author: &DeviceId,
    format: FactFormat,
    tag: u64,
    body: &[u8],
) -> Vec<u8> {
    let body = Bytes::new(body);
    let unsigned = match format.time_ms() {
        None => to_canonical(&(FACT_FORMAT_VERSION, ns, epoch, author, tag, body)),
        Some(t) => to_canonical(&(format.version(), t, ns, epoch, author, tag, body)),
    };
    [format.signing_domain(), &unsigned].concat()
}

/// The author's clock of timed fact bytes (formats 2 and 3), read from their fixed start
/// (`[2, time_ms, ...]`: an 8-element array head, the format, then the time), or `None` for
/// anything else. Total on any input, since [`FactId::of`] is.
pub(crate) fn timed_fact_clock(bytes: &[u8]) -> Option<u64> {
    const ARRAY_OF_8: u8 = 0x88;
    match bytes {
        [ARRAY_OF_8, 0x02 | 0x03, head, rest @ ..] if head >> 5 == 0 => {
            let n = match head & 0x1f {
                v @ 0..=23 => return Some(u64::from(v)),
                24 => 1,
                25 => 2,
                26 => 4,
                27 => 8,
                _ => return None,
            };
            let mut be = [0u8; 8];
            be[8 - n..].copy_from_slice(rest.get(..n)?);
            Some(u64::from_be_bytes(be))
        }
        _ => None,
    }
}

/// The author and payload of canonical fact bytes, without checking the signature: only for
/// bytes that were verified before they were stored (a store that checks every fact it reads
/// against its id). Anything that crosses a trust boundary goes through
/// [`VerifiedFact::decode`].
pub fn read_stored_payload(bytes: &[u8]) -> Result<(DeviceId, Payload), DecodeError> {
    let malformed = |e: serde_ipld_dagcbor::DecodeError<_>| DecodeError::Malformed(e.to_string());
    let (author, tag, body) = if timed_fact_clock(bytes).is_some() {
        let (_, _, _, _, author, tag, body, _): TimedWireTuple =
            serde_ipld_dagcbor::from_slice(bytes).map_err(malformed)?;
        (author, tag, body)
    } else {
        let (_, _, _, author, tag, body, _): WireTuple =
            serde_ipld_dagcbor::from_slice(bytes).map_err(malformed)?;
        (author, tag, body)
    };
    Ok((author, Payload::from_tag_body(tag, &body)?))
}

/// A signed fact. It may not verify: only [`VerifiedFact`] is trusted.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Fact {
    pub namespace: JournalNamespace,
    pub epoch: Epoch,
    pub author: DeviceId,
    /// Its format, with the author's clock when it wrote the fact for the timed formats.
    /// Nothing checks that clock against any other, since devices must agree on validity:
    /// it only orders the fact among others of its epoch.
    pub format: FactFormat,
    pub payload: Payload,
    pub signature: [u8; 64],
}

/// Reads just the leading version number of a wire fact, whatever follows.
struct VersionPeek(u64);

impl<'de> Deserialize<'de> for VersionPeek {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = VersionPeek;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array starting with a version number")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<VersionPeek, A::Error> {
                let v: u64 = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(VersionPeek(v))
            }
        }
        d.deserialize_seq(V)
    }
}

type WireTuple = (
    u64,
    JournalNamespace,
    Epoch,
    DeviceId,
    u64,
    ByteBuf,
    ByteBuf,
);
type TimedWireTuple = (
    u64,
    u64,
    JournalNamespace,
    Epoch,
    DeviceId,
    u64,
    ByteBuf,
    ByteBuf,
);

/// Below this many facts per thread, [`VerifiedFact::decode_batch`] stays on the caller's
/// thread: starting a thread costs about as much as a few verifications.
const PARALLEL_MIN_FACTS: usize = 32;

/// An author's key, decompressed once (a point decompression is about a tenth of a
/// verification).
#[derive(Clone, Copy)]
struct AuthorKey {
    point: VerifyingKey,
    /// Whether format 3 accepts it: under ZIP-215's cofactored equation any signature
    /// verifies for a key of small order, so tend refuses such keys there (`verify_strict`
    /// refuses them in formats 1 and 2).
    zip215_allowed: bool,
}

/// Authors' keys of a batch. Holds a few authors, as a batch does; past that it decompresses
/// anew.
#[derive(Default)]
struct KeyCache {
    keys: Vec<(DeviceId, Option<AuthorKey>)>,
}

impl KeyCache {
    const MAX_AUTHORS: usize = 16;

    /// The author's key for a fact of `format`, or `BadAuthorKey` exactly when
    /// `VerifyingKey::from_bytes` refuses it or, in format 3, it is of small order (the
    /// cache keeps refusals too, so the answer never depends on it).
    fn get(&mut self, author: &DeviceId, format: FactFormat) -> Result<VerifyingKey, DecodeError> {
        let key = match self.keys.iter().find(|(a, _)| a == author) {
            Some((_, key)) => *key,
            None => {
                let key = VerifyingKey::from_bytes(&author.0)
                    .ok()
                    .map(|point| AuthorKey {
                        point,
                        zip215_allowed: !point.is_weak(),
                    });
                if self.keys.len() < Self::MAX_AUTHORS {
                    self.keys.push((*author, key));
                }
                key
            }
        };
        match key {
            Some(k) if k.zip215_allowed || !matches!(format, FactFormat::TimedZip215 { .. }) => {
                Ok(k.point)
            }
            _ => Err(DecodeError::BadAuthorKey),
        }
    }
}

/// A fact whose encoding has passed every check but its signature.
struct Unverified {
    fact: Fact,
    tag: u64,
    body: ByteBuf,
}

impl Unverified {
    /// Size, version, canonical encoding and payload.
    fn parse(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_FACT_BYTES {
            return Err(DecodeError::Oversized {
                len: bytes.len(),
                max: MAX_FACT_BYTES,
            });
        }
        let VersionPeek(version) = serde_ipld_dagcbor::from_slice(bytes)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        let (format, namespace, epoch, author, tag, body, signature) = match version {
            FACT_FORMAT_VERSION => {
                let (_, ns, epoch, author, tag, body, sig): WireTuple = from_canonical(bytes)?;
                (FactFormat::Untimed, ns, epoch, author, tag, body, sig)
            }
            TIMED_FACT_FORMAT | ZIP215_FACT_FORMAT => {
                let (v, t, ns, epoch, author, tag, body, sig): TimedWireTuple =
                    from_canonical(bytes)?;
                let format =
                    FactFormat::from_version(v, t).ok_or(DecodeError::UnsupportedVersion(v))?;
                (format, ns, epoch, author, tag, body, sig)
            }
            other => return Err(DecodeError::UnsupportedVersion(other)),
        };
        let signature: [u8; 64] = signature
            .as_slice()
            .try_into()
            .map_err(|_| DecodeError::Malformed("signature must be 64 bytes".into()))?;
        let payload = Payload::from_tag_body(tag, &body)?;
        let fact = Fact {
            namespace,
            epoch,
            author,
            format,
            payload,
            signature,
        };
        Ok(Self { fact, tag, body })
    }

    fn signing_message(&self) -> Vec<u8> {
        let f = &self.fact;
        signing_message(
            &f.namespace,
            f.epoch,
            &f.author,
            f.format,
            self.tag,
            &self.body,
        )
    }

    /// The ZIP-215 check of a format-3 fact, its hash taken, ready to run alone or in a
    /// batch.
    fn zip215_item(&self) -> ed25519_zebra::batch::Item {
        let key = ed25519_zebra::VerificationKeyBytes::from(self.fact.author.0);
        let signature = ed25519_zebra::Signature::from(self.fact.signature);
        ed25519_zebra::batch::Item::from((key, signature, &self.signing_message()))
    }

    /// Checks the signature of a format-1 or format-2 fact (`verify_strict`); of a format-3
    /// fact whose key passes, hands back its ZIP-215 check for the caller to run with others
    /// ([`verify_zip215`]).
    fn check_or_defer(
        &self,
        keys: &mut KeyCache,
    ) -> Result<Option<ed25519_zebra::batch::Item>, DecodeError> {
        let key = keys.get(&self.fact.author, self.fact.format)?;
        if let FactFormat::TimedZip215 { .. } = self.fact.format {
            return Ok(Some(self.zip215_item()));
        }
        let signature = ed25519_dalek::Signature::from_bytes(&self.fact.signature);
        key.verify_strict(&self.signing_message(), &signature)
            .map_err(|_| DecodeError::BadSignature)?;
        Ok(None)
    }

    fn into_verified(self, bytes: &[u8]) -> VerifiedFact {
        VerifiedFact::from_parts(self.fact, bytes.to_vec())
    }
}

/// Runs the ZIP-215 checks of `items`: all at once, and one by one only when that fails, to
/// find which. Returns the indices (the items' first elements) whose signature is bad.
///
/// ZIP-215 is defined so that the batch equation accepts a set of signatures exactly when
/// each one's cofactored equation holds (but with probability 2^-128 over the random
/// coefficients), so the result is the same as checking each alone.
fn verify_zip215(items: Vec<(usize, ed25519_zebra::batch::Item)>) -> Vec<usize> {
    // A batch equation of one costs more than the plain check.
    if items.len() >= 2 {
        let mut batch = ed25519_zebra::batch::Verifier::new();
        for (_, item) in &items {
            batch.queue(item.clone());
        }
        if batch.verify(rand::thread_rng()).is_ok() {
            return Vec::new();
        }
    }
    items
        .into_iter()
        .filter(|(_, item)| item.clone().verify_single().is_err())
        .map(|(i, _)| i)
        .collect()
}

/// A fact whose encoding is canonical and whose author signature verifies. It can only be
/// made by signing ([`UnsignedFact::sign`]) or by verifying ([`VerifiedFact::decode`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct VerifiedFact {
    fact: Fact,
    id: FactId,
    bytes: Vec<u8>,
}

impl VerifiedFact {
    fn from_parts(fact: Fact, bytes: Vec<u8>) -> Self {
        let id = FactId::of(&bytes);
        Self { fact, id, bytes }
    }

    /// Decodes and verifies a fact: size, version, canonical encoding, author signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_chunk(&[bytes]).remove(0)
    }

    /// Decodes a fact read from the bytes of a certified snapshot blob: every check of
    /// [`VerifiedFact::decode`] but the author's Ed25519 signature, which the threshold
    /// signature over the blob stands for (DESIGN section 8: hydration checks hashes against
    /// that signature, not one signature per fact). The caller's duty, which
    /// `tend_snapshot::blob::read_certified_blob` carries out: hand back nothing decoded
    /// this way unless the bytes it came from hash to `blob.cid()`.
    pub fn decode_certified(
        bytes: &[u8],
        blob: &crate::maintenance::CertifiedBlob,
    ) -> Result<Self, DecodeError> {
        let _ = blob;
        Unverified::parse(bytes).map(|u| u.into_verified(bytes))
    }

    /// Decodes a fact this device verified before it stored it, read back from its own
    /// store, which checks every fact it reads against its id ([`FactId::of`] these
    /// bytes): every check of [`VerifiedFact::decode`] but the signature, which was
    /// checked on the way in.
    /// Only for a store's own read path (building a snapshot blob of a million facts must not
    /// verify a million signatures again); anything that crosses a trust boundary goes
    /// through [`VerifiedFact::decode`].
    pub fn decode_stored(bytes: &[u8]) -> Result<Self, DecodeError> {
        Unverified::parse(bytes).map(|u| u.into_verified(bytes))
    }

    /// [`VerifiedFact::decode`] of every fact of a batch, the results in the batch's order.
    ///
    /// Exactly the same checks and results as one `decode` per fact (devices that disagreed
    /// on validity would diverge), only faster:
    /// - large batches are split over the machine's cores (one Ed25519 verification costs
    ///   tens of microseconds, so a catch-up of a million facts is bound by it);
    /// - each author's key is decompressed once per thread rather than once per fact (a
    ///   batch holds the facts of a handful of devices);
    /// - the format-3 facts of each thread are checked in one ZIP-215 batch equation, which
    ///   costs about a quarter of checking them one by one when they share a few authors,
    ///   and accepts exactly what the single checks accept ([`FactFormat::TimedZip215`]).
    ///
    /// Deterministic: the same batch gives the same results in the same order whatever
    /// the number of threads.
    pub fn decode_batch<B: AsRef<[u8]> + Sync>(batch: &[B]) -> Vec<Result<Self, DecodeError>> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(batch.len() / PARALLEL_MIN_FACTS)
            .max(1);
        if threads == 1 {
            return Self::decode_chunk(batch);
        }
        let per_thread = batch.len().div_ceil(threads);
        std::thread::scope(|s| {
            let mut chunks = batch.chunks(per_thread);
            let first = chunks.next().unwrap_or_default();
            let others: Vec<_> = chunks
                .map(|c| s.spawn(move || Self::decode_chunk(c)))
                .collect();
            // This thread takes the first chunk instead of waiting idle.
            let mut out = Self::decode_chunk(first);
            for handle in others {
                match handle.join() {
                    Ok(mut part) => out.append(&mut part),
                    // Decoding does not panic on any input; if it ever did, the panic
                    // belongs to the caller, as with `decode`.
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            out
        })
    }

    /// Decodes and verifies a chunk on this thread, its format-3 signatures in one batch.
    /// A fact becomes a `VerifiedFact` only once that batch has passed it.
    fn decode_chunk<B: AsRef<[u8]>>(chunk: &[B]) -> Vec<Result<Self, DecodeError>> {
        let mut keys = KeyCache::default();
        let mut zip215 = Vec::new();
        let mut checked: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let fact = Unverified::parse(bytes.as_ref())?;
                if let Some(item) = fact.check_or_defer(&mut keys)? {
                    zip215.push((i, item));
                }
                Ok(fact)
            })
            .collect();
        for bad in verify_zip215(zip215) {
            checked[bad] = Err(DecodeError::BadSignature);
        }
        checked
            .into_iter()
            .zip(chunk)
            .map(|(fact, bytes)| fact.map(|f| f.into_verified(bytes.as_ref())))
            .collect()
    }

    /// The fact id ([`FactId::of`] its canonical encoding).
    pub fn id(&self) -> FactId {
        self.id
    }

    /// The author's clock when it wrote the fact (formats 2 and 3), in milliseconds since the Unix
    /// epoch; untrusted, it only orders facts.
    pub fn time_ms(&self) -> Option<u64> {
        self.fact.format.time_ms()
    }

    /// Its format, which says how its signature was checked.
    pub fn format(&self) -> FactFormat {
        self.fact.format
    }

    /// The canonical encoding.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn fact(&self) -> &Fact {
        &self.fact
    }

    pub fn namespace(&self) -> JournalNamespace {
        self.fact.namespace
    }

    pub fn epoch(&self) -> Epoch {
        self.fact.epoch
    }

    pub fn author(&self) -> DeviceId {
        self.fact.author
    }

    pub fn payload(&self) -> &Payload {
        &self.fact.payload
    }

    /// The key facts are ordered by everywhere: `(epoch, id)`.
    pub fn order_key(&self) -> (Epoch, FactId) {
        (self.fact.epoch, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ContextId, ProtocolVersion};
    use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT as B, EIGHT_TORSION};
    use curve25519_dalek::{EdwardsPoint, Scalar};
    use sha2::{Digest, Sha512};

    /// A fact of `format` signed by hand with the secret scalar `a` under the public point
    /// `author` and the nonce point `r_point = [r]B + torsion`: what no honest signer makes,
    /// but a member's device could.
    fn hand_signed(
        format: FactFormat,
        author: EdwardsPoint,
        a: Scalar,
        r: Scalar,
        torsion: EdwardsPoint,
    ) -> Vec<u8> {
        let (ns, epoch) = (JournalNamespace::Context(ContextId([3; 32])), Epoch(1));
        let author = DeviceId(author.compress().to_bytes());
        let (tag, body) = Payload::Application {
            kind: "k".into(),
            data: b"crafted".to_vec(),
        }
        .to_tag_body();
        let msg = signing_message(&ns, epoch, &author, format, tag, &body);
        let r_bytes = (r * B + torsion).compress().to_bytes();
        let k = Scalar::from_bytes_mod_order_wide(
            &Sha512::new()
                .chain_update(r_bytes)
                .chain_update(author.0)
                .chain_update(&msg)
                .finalize()
                .into(),
        );
        let s = r + k * a;
        let signature = [r_bytes, s.to_bytes()].concat();
        let (body, sig) = (Bytes::new(&body), Bytes::new(&signature));
        let t = format.time_ms().expect("a timed format");
        to_canonical(&(format.version(), t, ns, epoch, author, tag, body, sig))
    }

    fn honest(i: u64, format: FactFormat) -> Vec<u8> {
        UnsignedFact {
            namespace: JournalNamespace::Context(ContextId([3; 32])),
            epoch: Epoch(1),
            payload: Payload::Application {
                kind: "k".into(),
                data: i.to_le_bytes().to_vec(),
            },
        }
        .sign_with(&SigningKey::from_bytes(&[i as u8 % 3; 32]), format)
        .bytes()
        .to_vec()
    }

    /// The results of one `decode` per fact, checked to be those of `decode_batch` with the
    /// facts among many honest ones (so the batch equation runs and, failing, falls back).
    fn decoded_both_ways(crafted: &[u8], format: FactFormat) -> Result<(), DecodeError> {
        let single = VerifiedFact::decode(crafted).map(|_| ());
        let mut batch: Vec<Vec<u8>> = (0..200).map(|i| honest(i, format)).collect();
        batch.insert(77, crafted.to_vec());
        let results = VerifiedFact::decode_batch(&batch);
        for (i, r) in results.iter().enumerate() {
            match i {
                77 => assert_eq!(r.as_ref().map(|_| ()).map_err(Clone::clone), single),
                _ => assert!(r.is_ok(), "honest fact {i}: {r:?}"),
            }
        }
        single
    }

    /// A nonce with a small-order component: the cofactored equation of ZIP-215 holds, the
    /// cofactorless one of `verify_strict` does not. Each format gives one answer, batch or
    /// not: format 3 accepts, format 2 refuses.
    #[test]
    fn a_nonce_with_torsion_is_judged_by_the_format_alone() {
        let a = Scalar::from_bytes_mod_order([7; 32]);
        let r = Scalar::from_bytes_mod_order([9; 32]);
        let time_ms = 1_765_000_000_000;
        for (format, expected) in [
            (FactFormat::TimedZip215 { time_ms }, Ok(())),
            (
                FactFormat::Timed { time_ms },
                Err(DecodeError::BadSignature),
            ),
        ] {
            let crafted = hand_signed(format, a * B, a, r, EIGHT_TORSION[1]);
            assert_eq!(decoded_both_ways(&crafted, format), expected, "{format:?}");
            // Without the torsion both accept: the difference is the rule, not the signing.
            let plain = hand_signed(format, a * B, a, r, EdwardsPoint::default());
            assert_eq!(decoded_both_ways(&plain, format), Ok(()), "{format:?}");
        }
    }

    /// Under ZIP-215 alone, a small-order key verifies any signature whose nonce is `[s]B`;
    /// format 3 refuses the key itself, in a batch and alone.
    #[test]
    fn format_3_refuses_a_small_order_author_key() {
        let format = FactFormat::TimedZip215 {
            time_ms: 1_765_000_000_000,
        };
        let s = Scalar::from_bytes_mod_order([5; 32]);
        // With `a = 0` the hand signature is `s = r`, nonce `[r]B`: valid for any message
        // under the cofactored equation, since `[8][k]A` vanishes.
        let crafted = hand_signed(
            format,
            EIGHT_TORSION[1],
            Scalar::ZERO,
            s,
            EdwardsPoint::default(),
        );
        let parsed = Unverified::parse(&crafted).expect("well formed");
        assert!(
            parsed.zip215_item().verify_single().is_ok(),
            "ZIP-215 alone accepts it"
        );
        assert_eq!(
            decoded_both_ways(&crafted, format),
            Err(DecodeError::BadAuthorKey)
        );
    }

    /// A device writes the newest format the oldest member's release reads.
    #[test]
    fn the_written_format_follows_the_oldest_member() {
        let v = |patch| crate::ids::ProtocolVersion {
            major: 1,
            minor: 0,
            patch,
        };
        let newest = |oldest| FactFormat::newest_readable_by(oldest, 5);
        assert_eq!(newest(v(0)), FactFormat::Untimed);
        assert_eq!(newest(v(1)), FactFormat::Timed { time_ms: 5 });
        assert_eq!(newest(v(2)), FactFormat::TimedZip215 { time_ms: 5 });
        assert_eq!(
            newest(ProtocolVersion::CURRENT),
            FactFormat::TimedZip215 { time_ms: 5 }
        );
    }

    /// One bad signature among many format-3 facts: the batch equation fails, and the
    /// single checks name exactly that fact.
    #[test]
    fn a_failed_batch_names_exactly_its_bad_facts() {
        let format = FactFormat::TimedZip215 { time_ms: 1 };
        let mut forged = honest(500, format);
        let n = forged.len();
        forged[n - 1] ^= 0x40;
        assert_eq!(
            decoded_both_ways(&forged, format),
            Err(DecodeError::BadSignature)
        );
    }
}
