//! Signed, expiring address records of the rendezvous service and the bounded table that
//! keeps them. Sans-IO: the current time (Unix milliseconds) is always an argument.
//!
//! A record says "device D listens at these addresses from `issued_at` until
//! `expires_at`", signed by D's device key. Both the server and every client check it with
//! [`AddressRecord::verify`]: the server so that it stores nothing a device did not say,
//! the client because the server is not trusted.

use std::collections::HashMap;
use std::net::SocketAddr;

use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};
use tend_core::{DeviceId, GroupKey};

/// Domain string prefixed to the signed encoding, so a record signature can never be
/// mistaken for a fact signature or anything else the device key signs.
pub const RECORD_DOMAIN: &[u8] = b"tend-address-record-v1";

/// What a record may claim and how far clocks may disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLimits {
    /// Most addresses in one record.
    pub max_addrs: usize,
    /// Longest lifetime (`expires_at - issued_at`), in milliseconds: a stolen or stale
    /// record cannot outlive this.
    pub max_lifetime_ms: u64,
    /// How far in the future `issued_at` may lie (clock skew), in milliseconds. A record
    /// from further ahead would win every replacement until the clock caught up.
    pub max_skew_ms: u64,
}

impl Default for RecordLimits {
    fn default() -> Self {
        Self {
            max_addrs: 8,
            max_lifetime_ms: 24 * 3600 * 1000,
            max_skew_ms: 60 * 1000,
        }
    }
}

/// Why a record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the record lists no address")]
    NoAddrs,
    #[error("the record lists {count} addresses (at most {max})")]
    TooManyAddrs { count: usize, max: usize },
    #[error("the record expires before it is issued")]
    BadLifetime,
    #[error("the record's lifetime of {lifetime_ms} ms exceeds {max_ms} ms")]
    TooLong { lifetime_ms: u64, max_ms: u64 },
    #[error("the record is issued in the future ({issued_at} > now {now})")]
    FromFuture { issued_at: u64, now: u64 },
    #[error("the record expired at {expires_at} (now {now})")]
    Expired { expires_at: u64, now: u64 },
    #[error("the record's signature does not verify")]
    BadSignature,
    #[error("a record issued at {stored} or later is already stored")]
    Stale { stored: u64 },
    #[error("the record table is full ({capacity} devices)")]
    TableFull { capacity: usize },
    #[error("asked for device {expected}, got a record of {got}")]
    WrongDevice { expected: DeviceId, got: DeviceId },
}

/// A device's signed statement of where it listens, valid in `[issued_at, expires_at)`.
/// JSON: `{"device_id": hex, "addrs": ["IP:PORT"], "issued_at": ms, "expires_at": ms,
/// "signature": hex}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressRecord {
    /// The device, whose key signed the record.
    #[serde(with = "display_str")]
    pub device_id: DeviceId,
    /// Direct addresses of its endpoint.
    pub addrs: Vec<SocketAddr>,
    /// Unix milliseconds when it was signed; a newer record replaces an older one.
    pub issued_at: u64,
    /// Unix milliseconds after which nobody may use it.
    pub expires_at: u64,
    /// Ed25519 over [`AddressRecord::signed_bytes`].
    #[serde(with = "hex_sig")]
    pub signature: [u8; 64],
}

impl AddressRecord {
    /// Signs a record for the device of `key`.
    pub fn sign(
        key: &SigningKey,
        addrs: Vec<SocketAddr>,
        issued_at: u64,
        expires_at: u64,
    ) -> AddressRecord {
        let mut record = AddressRecord {
            device_id: DeviceId(key.verifying_key().to_bytes()),
            addrs,
            issued_at,
            expires_at,
            signature: [0; 64],
        };
        record.signature = key.sign(&record.signed_bytes()).to_bytes();
        record
    }

    /// The canonical encoding that is signed: the domain, the device id, `issued_at` and
    /// `expires_at` (u64 BE), the address count (u32 BE), then each address as its
    /// `IP:PORT` text with a u16 BE length. Every field has a fixed size or a length, so
    /// two different records never encode alike.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_DOMAIN.len() + 52 + self.addrs.len() * 24);
        out.extend_from_slice(RECORD_DOMAIN);
        out.extend_from_slice(&self.device_id.0);
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(&(self.addrs.len() as u32).to_be_bytes());
        for a in &self.addrs {
            let text = a.to_string();
            out.extend_from_slice(&(text.len() as u16).to_be_bytes());
            out.extend_from_slice(text.as_bytes());
        }
        out
    }

    /// Checks the record at time `now`: addresses, lifetime, not from the future (beyond
    /// the allowed skew), not expired, and the signature (cheap checks first, so garbage
    /// costs no signature verification).
    pub fn verify(&self, now: u64, limits: &RecordLimits) -> Result<(), RecordError> {
        if self.addrs.is_empty() {
            return Err(RecordError::NoAddrs);
        }
        if self.addrs.len() > limits.max_addrs {
            return Err(RecordError::TooManyAddrs {
                count: self.addrs.len(),
                max: limits.max_addrs,
            });
        }
        if self.expires_at <= self.issued_at {
            return Err(RecordError::BadLifetime);
        }
        let lifetime_ms = self.expires_at - self.issued_at;
        if lifetime_ms > limits.max_lifetime_ms {
            return Err(RecordError::TooLong {
                lifetime_ms,
                max_ms: limits.max_lifetime_ms,
            });
        }
        if self.issued_at > now.saturating_add(limits.max_skew_ms) {
            return Err(RecordError::FromFuture {
                issued_at: self.issued_at,
                now,
            });
        }
        if self.expires_at <= now {
            return Err(RecordError::Expired {
                expires_at: self.expires_at,
                now,
            });
        }
        if !GroupKey(self.device_id.0).verify(&self.signed_bytes(), &self.signature) {
            return Err(RecordError::BadSignature);
        }
        Ok(())
    }

    /// The address peers dial: the record's first.
    pub fn peer_addr(&self) -> Option<super::PeerAddr> {
        self.addrs.first().map(|a| super::PeerAddr {
            device: self.device_id,
            addr: *a,
        })
    }

    /// What a client does with an answer to "where is `expected`?": the record must be
    /// `expected`'s and verify now.
    pub fn verify_for(
        &self,
        expected: DeviceId,
        now: u64,
        limits: &RecordLimits,
    ) -> Result<(), RecordError> {
        if self.device_id != expected {
            return Err(RecordError::WrongDevice {
                expected,
                got: self.device_id,
            });
        }
        self.verify(now, limits)
    }
}

/// What [`RecordTable::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The device had no live record.
    New,
    /// A record with an older `issued_at` was replaced.
    Replaced,
    /// The very same record was already stored (a harmless retry).
    Unchanged,
}

/// The rendezvous server's records: at most `capacity` devices, each with its newest
/// verified record, dropped when it expires.
#[derive(Debug)]
pub struct RecordTable {
    records: HashMap<DeviceId, AddressRecord>,
    capacity: usize,
    limits: RecordLimits,
}

impl RecordTable {
    /// An empty table for at most `capacity` devices.
    pub fn new(capacity: usize, limits: RecordLimits) -> Self {
        Self {
            records: HashMap::new(),
            capacity,
            limits,
        }
    }

    /// Verifies and stores a record. A stored record is replaced only by one with a newer
    /// `issued_at`, so a replayed old record cannot roll a device's address back.
    pub fn insert(&mut self, record: AddressRecord, now: u64) -> Result<Inserted, RecordError> {
        record.verify(now, &self.limits)?;
        if let Some(old) = self.records.get(&record.device_id) {
            if old.expires_at > now {
                if *old == record {
                    return Ok(Inserted::Unchanged);
                }
                if record.issued_at <= old.issued_at {
                    return Err(RecordError::Stale {
                        stored: old.issued_at,
                    });
                }
                self.records.insert(record.device_id, record);
                return Ok(Inserted::Replaced);
            }
        }
        if !self.records.contains_key(&record.device_id) && self.records.len() >= self.capacity {
            // Make room from expired records before refusing a newcomer.
            self.expire(now);
            if self.records.len() >= self.capacity {
                return Err(RecordError::TableFull {
                    capacity: self.capacity,
                });
            }
        }
        self.records.insert(record.device_id, record);
        Ok(Inserted::New)
    }

    /// The live record of a device.
    pub fn get(&self, device: &DeviceId, now: u64) -> Option<&AddressRecord> {
        self.records.get(device).filter(|r| r.expires_at > now)
    }

    /// Drops expired records; returns how many.
    pub fn expire(&mut self, now: u64) -> usize {
        let before = self.records.len();
        self.records.retain(|_, r| r.expires_at > now);
        before - self.records.len()
    }

    /// Records held (expired ones included until the next [`RecordTable::expire`]).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the table holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Serde as the `Display`/`FromStr` text (device ids as hex in JSON).
mod display_str {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }
}

/// Serde of a 64-byte signature as 128 hex digits.
mod hex_sig {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 64];
        hex::decode_to_slice(&s, &mut out).map_err(D::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn record(seed: u8, port: u16, issued_at: u64, lifetime: u64) -> AddressRecord {
        AddressRecord::sign(
            &key(seed),
            vec![addr(port)],
            issued_at,
            issued_at + lifetime,
        )
    }

    #[test]
    fn a_signed_record_verifies_and_round_trips_through_json() {
        let r = record(1, 4000, NOW, 60_000);
        let limits = RecordLimits::default();
        r.verify(NOW, &limits).unwrap();
        r.verify_for(r.device_id, NOW, &limits).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(&r.device_id.to_string()));
        assert!(json.contains("\"127.0.0.1:4000\""));
        let back: AddressRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert!(serde_json::from_str::<AddressRecord>(&json.replace('}', ",\"x\":1}")).is_err());
    }

    #[test]
    fn tampering_and_forgery_break_the_signature() {
        let limits = RecordLimits::default();
        let r = record(1, 4000, NOW, 60_000);
        let mut moved = r.clone();
        moved.addrs = vec![addr(4001)];
        assert_eq!(moved.verify(NOW, &limits), Err(RecordError::BadSignature));
        let mut later = r.clone();
        later.expires_at += 1;
        assert_eq!(later.verify(NOW, &limits), Err(RecordError::BadSignature));
        // Signed by key 2 but claiming to be device 1.
        let mut forged = record(2, 4000, NOW, 60_000);
        forged.device_id = r.device_id;
        assert_eq!(forged.verify(NOW, &limits), Err(RecordError::BadSignature));
        // The record of another device is not an answer for this one.
        assert!(matches!(
            record(2, 4000, NOW, 60_000).verify_for(r.device_id, NOW, &limits),
            Err(RecordError::WrongDevice { .. })
        ));
    }

    #[test]
    fn time_and_shape_limits_are_enforced() {
        let limits = RecordLimits::default();
        let expired = record(1, 4000, NOW - 10_000, 5_000);
        assert!(matches!(
            expired.verify(NOW, &limits),
            Err(RecordError::Expired { .. })
        ));
        // Expiry is exclusive: at `expires_at` the record is dead.
        let r = record(1, 4000, NOW, 1_000);
        assert!(r.verify(NOW + 999, &limits).is_ok());
        assert!(r.verify(NOW + 1_000, &limits).is_err());
        let future = record(1, 4000, NOW + limits.max_skew_ms + 1, 1_000);
        assert!(matches!(
            future.verify(NOW, &limits),
            Err(RecordError::FromFuture { .. })
        ));
        let skewed = record(1, 4000, NOW + limits.max_skew_ms, 1_000);
        assert!(skewed.verify(NOW, &limits).is_ok());
        let long = record(1, 4000, NOW, limits.max_lifetime_ms + 1);
        assert!(matches!(
            long.verify(NOW, &limits),
            Err(RecordError::TooLong { .. })
        ));
        let backwards = AddressRecord::sign(&key(1), vec![addr(1)], NOW, NOW);
        assert_eq!(
            backwards.verify(NOW, &limits),
            Err(RecordError::BadLifetime)
        );
        let none = AddressRecord::sign(&key(1), vec![], NOW, NOW + 1);
        assert_eq!(none.verify(NOW, &limits), Err(RecordError::NoAddrs));
        let many = AddressRecord::sign(&key(1), (1..=9).map(addr).collect(), NOW, NOW + 1);
        assert!(matches!(
            many.verify(NOW, &limits),
            Err(RecordError::TooManyAddrs { .. })
        ));
    }

    #[test]
    fn the_table_keeps_the_newest_record_and_refuses_rollbacks() {
        let mut t = RecordTable::new(10, RecordLimits::default());
        let first = record(1, 4000, NOW, 60_000);
        let id = first.device_id;
        assert_eq!(t.insert(first.clone(), NOW), Ok(Inserted::New));
        assert_eq!(t.insert(first.clone(), NOW), Ok(Inserted::Unchanged));
        let moved = record(1, 4001, NOW + 5, 60_000);
        assert_eq!(t.insert(moved.clone(), NOW + 5), Ok(Inserted::Replaced));
        assert_eq!(t.get(&id, NOW + 6), Some(&moved));
        // Replaying the older record, or another at the same instant, changes nothing.
        assert!(matches!(
            t.insert(first, NOW + 6),
            Err(RecordError::Stale { .. })
        ));
        let same_time = record(1, 4002, NOW + 5, 60_000);
        assert!(matches!(
            t.insert(same_time, NOW + 6),
            Err(RecordError::Stale { .. })
        ));
        assert_eq!(t.get(&id, NOW + 6), Some(&moved));
        // A forged record never enters.
        let mut forged = record(2, 4003, NOW + 10, 60_000);
        forged.device_id = id;
        assert_eq!(t.insert(forged, NOW + 10), Err(RecordError::BadSignature));
        assert_eq!(t.get(&id, NOW + 10), Some(&moved));
        // Expired records are invisible, then dropped.
        assert_eq!(t.get(&id, NOW + 5 + 60_000), None);
        assert_eq!(t.expire(NOW + 5 + 60_000), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn an_expired_record_may_be_replaced_by_any_live_one() {
        let mut t = RecordTable::new(10, RecordLimits::default());
        t.insert(record(1, 4000, NOW, 1_000), NOW).unwrap();
        // After expiry (the device's clock went back, say) a record that is not newer is
        // accepted: the dead one protects nothing.
        let again = record(1, 4001, NOW - 500, 10_000);
        assert_eq!(t.insert(again.clone(), NOW + 2_000), Ok(Inserted::New));
        assert_eq!(t.get(&again.device_id, NOW + 2_000), Some(&again));
    }

    #[test]
    fn the_table_is_bounded_but_makes_room_from_expired_records() {
        let mut t = RecordTable::new(2, RecordLimits::default());
        t.insert(record(1, 1, NOW, 1_000), NOW).unwrap();
        t.insert(record(2, 2, NOW, 60_000), NOW).unwrap();
        assert_eq!(
            t.insert(record(3, 3, NOW, 60_000), NOW),
            Err(RecordError::TableFull { capacity: 2 })
        );
        // A device already in the table may still update its record.
        assert_eq!(
            t.insert(record(2, 5, NOW + 1, 60_000), NOW + 1),
            Ok(Inserted::Replaced)
        );
        // Once record 1 expired, device 3 fits.
        assert_eq!(
            t.insert(record(3, 3, NOW + 1_000, 60_000), NOW + 1_000),
            Ok(Inserted::New)
        );
        assert_eq!(t.len(), 2);
    }
}
