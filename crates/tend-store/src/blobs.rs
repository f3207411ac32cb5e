//! The content-addressed blob table: blobs keyed by their CID, checked against it on read.

use redb::ReadableTable;
use tend_core::ids::{CODEC_DAG_CBOR, CODEC_RAW};
use tend_core::ContentId;

use crate::error::StoreError;
use crate::store::{Store, BLOBS};

impl Store {
    /// Stores `bytes` under their CID (codec [`CODEC_RAW`] or [`CODEC_DAG_CBOR`]) and returns
    /// it. Storing the same content twice is a no-op.
    pub fn put_blob(&self, codec: u64, bytes: &[u8]) -> Result<ContentId, StoreError> {
        if codec != CODEC_RAW && codec != CODEC_DAG_CBOR {
            return Err(StoreError::UnsupportedCodec {
                path: self.path.clone(),
                codec,
            });
        }
        let cid = ContentId::of(codec, bytes);
        let key = cid.to_bytes();
        let _writer = self.lock_writer();
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = tx.open_table(BLOBS).map_err(|e| self.err(e))?;
            if t.get(key.as_slice()).map_err(|e| self.err(e))?.is_none() {
                t.insert(key.as_slice(), bytes).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(cid)
    }

    /// The content of a blob, verified against its CID.
    pub fn get_blob(&self, cid: &ContentId) -> Result<Option<Vec<u8>>, StoreError> {
        let rtx = self.read_txn()?;
        let t = self.open_ro(&rtx, BLOBS)?;
        let Some(v) = t.get(cid.to_bytes().as_slice()).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let bytes = v.value().to_vec();
        if !cid.matches(&bytes) {
            return Err(StoreError::BlobCorrupt {
                path: self.path.clone(),
                cid: *cid,
            });
        }
        Ok(Some(bytes))
    }

    /// Lends the content of a blob, verified against its CID, to `f` without copying it
    /// (a snapshot blob can be tens of MiB; [`Store::get_blob`] would hold it twice).
    pub fn with_blob<T>(
        &self,
        cid: &ContentId,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>, StoreError> {
        let rtx = self.read_txn()?;
        let t = self.open_ro(&rtx, BLOBS)?;
        let Some(v) = t.get(cid.to_bytes().as_slice()).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        if !cid.matches(v.value()) {
            return Err(StoreError::BlobCorrupt {
                path: self.path.clone(),
                cid: *cid,
            });
        }
        Ok(Some(f(v.value())))
    }

    /// Stores the blob `cid` of exactly `len` bytes, which `fill` writes straight into the
    /// reserved value (so a streamed blob is held once, in the page it is written to, not
    /// also in a buffer of the caller's). The transaction commits only if `fill` succeeds
    /// and the bytes hash to `cid`; otherwise nothing is stored. `fill`'s own error comes
    /// back as the inner `Err`.
    pub fn put_blob_with<E>(
        &self,
        cid: &ContentId,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Result<(), E>, StoreError> {
        let codec = cid.codec();
        if codec != CODEC_RAW && codec != CODEC_DAG_CBOR {
            return Err(StoreError::UnsupportedCodec {
                path: self.path.clone(),
                codec,
            });
        }
        let key = cid.to_bytes();
        let _writer = self.lock_writer();
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = tx.open_table(BLOBS).map_err(|e| self.err(e))?;
            let mut value = t
                .insert_reserve(key.as_slice(), len)
                .map_err(|e| self.err(e))?;
            if let Err(e) = fill(value.as_mut()) {
                // Dropping the transaction without a commit aborts it.
                return Ok(Err(e));
            }
            if !cid.matches(value.as_mut()) {
                return Err(StoreError::BlobCorrupt {
                    path: self.path.clone(),
                    cid: *cid,
                });
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Ok(()))
    }

    /// Whether a blob is stored (without reading or checking it).
    pub fn has_blob(&self, cid: &ContentId) -> Result<bool, StoreError> {
        let rtx = self.read_txn()?;
        let t = self.open_ro(&rtx, BLOBS)?;
        let found = t
            .get(cid.to_bytes().as_slice())
            .map_err(|e| self.err(e))?
            .is_some();
        Ok(found)
    }

    /// Deletes a blob; returns whether it was stored.
    pub fn delete_blob(&self, cid: &ContentId) -> Result<bool, StoreError> {
        let _writer = self.lock_writer();
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let removed = {
            let mut t = tx.open_table(BLOBS).map_err(|e| self.err(e))?;
            let removed = t
                .remove(cid.to_bytes().as_slice())
                .map_err(|e| self.err(e))?
                .is_some();
            removed
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(removed)
    }

    /// Every stored blob with its size in bytes, in CID byte order.
    pub fn blobs(&self) -> Result<Vec<(ContentId, u64)>, StoreError> {
        let rtx = self.read_txn()?;
        let t = self.open_ro(&rtx, BLOBS)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let cid = ContentId::from_bytes(k.value())
                .map_err(|e| self.corrupt(format!("malformed blob key: {e}")))?;
            out.push((cid, v.value().len() as u64));
        }
        Ok(out)
    }
}
