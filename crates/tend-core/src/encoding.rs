//! Canonical DAG-CBOR encoding: one value has exactly one byte string.
//!
//! Decoding re-encodes what it read and compares: any input that is not the canonical form
//! of the value it decodes to is rejected, so a fact has exactly one id.

use serde::{de::DeserializeOwned, Serialize};

use crate::error::DecodeError;

/// Encodes `value` as canonical DAG-CBOR.
///
/// Our types only contain integers, byte strings, text and arrays, which always encode,
/// so a failure here is a bug in a `Serialize` impl of this crate.
pub fn to_canonical<T: Serialize>(value: &T) -> Vec<u8> {
    serde_ipld_dagcbor::to_vec(value).expect("tend types always encode as DAG-CBOR")
}

/// Decodes `bytes`, rejecting anything that is not the canonical encoding of the result.
pub fn from_canonical<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    use serde_ipld_dagcbor::DecodeError as E;
    let value: T = serde_ipld_dagcbor::from_slice(bytes).map_err(|e| match e {
        E::NonMinimal { .. } | E::IndefiniteSize | E::UnorderedKey => DecodeError::NonCanonical,
        other => DecodeError::Malformed(other.to_string()),
    })?;
    if to_canonical(&value) != bytes {
        return Err(DecodeError::NonCanonical);
    }
    Ok(value)
}

/// Serde adapter for fixed-size byte arrays as CBOR byte strings (not arrays of integers).
pub mod fixed_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let buf = serde_bytes::ByteBuf::deserialize(d)?;
        <[u8; N]>::try_from(buf.as_slice())
            .map_err(|_| D::Error::custom(format!("expected {N} bytes, got {}", buf.len())))
    }
}
