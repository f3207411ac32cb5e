//! The storage peer's state in one redb file: the facts pushed to it, the encrypted blobs,
//! their sealed keys, the capsule fragments of each re-encryption, and which fragment sets
//! were applied. Every write is one transaction.

use std::collections::BTreeSet;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tend_core::{AuthorityId, ContentId, VerifiedFact};
use tend_vault::umbral::CFRAG_BYTES;
use tend_vault::SealedContentKey;

use crate::error::StorageError;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const FACTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("facts");
const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");
const SEALED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sealed_keys");
/// `(ciphertext CID, receiving epoch)` -> the capsule fragments, concatenated.
const CFRAGS: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("cfrags");
/// `(from, to)` fragment sets already applied to every stored key of `from`.
const REKEYED: TableDefinition<(u64, u64), ()> = TableDefinition::new("rekeyed");

/// A stored blob as the storage peer serves it.
pub struct StoredBlob {
    pub blob: Vec<u8>,
    pub sealed_key: Vec<u8>,
    /// Capsule fragments to the asked epoch, if a re-encryption produced them.
    pub cfrags: Vec<Vec<u8>>,
}

/// The storage peer's redb file.
pub struct VaultStore {
    db: Database,
}

impl VaultStore {
    /// Opens (or creates) the file, bound to `authority`: a file of another authority is
    /// refused before anything is written.
    pub fn open(path: &Path, authority: AuthorityId) -> Result<Self, StorageError> {
        let db = Database::builder().set_cache_size(16 << 20).create(path)?;
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let existing = meta.get("authority")?.map(|v| v.value().to_vec());
            match existing {
                Some(a) if a != authority.0 => {
                    return Err(StorageError::Store(format!(
                        "{} belongs to another authority",
                        path.display()
                    )))
                }
                Some(_) => {}
                None => {
                    meta.insert("authority", authority.0.as_slice())?;
                }
            }
            tx.open_table(FACTS)?;
            tx.open_table(BLOBS)?;
            tx.open_table(SEALED)?;
            tx.open_table(CFRAGS)?;
            tx.open_table(REKEYED)?;
        }
        tx.commit()?;
        Ok(Self { db })
    }

    /// The facts admitted so far (checked when they were pushed).
    pub fn facts(&self) -> Result<Vec<VerifiedFact>, StorageError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(FACTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, bytes) = entry?;
            out.push(
                VerifiedFact::decode_stored(bytes.value())
                    .map_err(|e| StorageError::Store(format!("a stored fact: {e}")))?,
            );
        }
        Ok(out)
    }

    pub fn insert_facts(&self, facts: &[VerifiedFact]) -> Result<(), StorageError> {
        if facts.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(FACTS)?;
            for f in facts {
                table.insert(&f.id().0, f.bytes())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Stores a blob, its sealed key and the fragments already due for it, atomically.
    pub fn put(
        &self,
        cid: &ContentId,
        sealed: &SealedContentKey,
        blob: &[u8],
        cfrags: &[(u64, Vec<Vec<u8>>)],
    ) -> Result<(), StorageError> {
        let key = cid.to_bytes();
        let tx = self.db.begin_write()?;
        {
            tx.open_table(BLOBS)?.insert(key.as_slice(), blob)?;
            tx.open_table(SEALED)?
                .insert(key.as_slice(), sealed.to_bytes().as_slice())?;
            let mut table = tx.open_table(CFRAGS)?;
            for (to, frags) in cfrags {
                table.insert((key.as_slice(), *to), frags.concat().as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Stores many checked blobs with their sealed keys in one transaction (an import).
    pub fn put_many(
        &self,
        blobs: &[(ContentId, SealedContentKey, Vec<u8>)],
    ) -> Result<(), StorageError> {
        let tx = self.db.begin_write()?;
        {
            let mut bodies = tx.open_table(BLOBS)?;
            let mut keys = tx.open_table(SEALED)?;
            for (cid, sealed, blob) in blobs {
                let key = cid.to_bytes();
                bodies.insert(key.as_slice(), blob.as_slice())?;
                keys.insert(key.as_slice(), sealed.to_bytes().as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Removes blobs with their sealed keys and every fragment of them, in one
    /// transaction; returns how many were stored.
    pub fn remove(&self, cids: &[ContentId]) -> Result<u64, StorageError> {
        let tx = self.db.begin_write()?;
        let mut removed = 0;
        {
            let mut bodies = tx.open_table(BLOBS)?;
            let mut keys = tx.open_table(SEALED)?;
            let mut frags = tx.open_table(CFRAGS)?;
            for cid in cids {
                let key = cid.to_bytes();
                if bodies.remove(key.as_slice())?.is_some() {
                    removed += 1;
                }
                keys.remove(key.as_slice())?;
                let epochs: Vec<u64> = frags
                    .range((key.as_slice(), 0)..=(key.as_slice(), u64::MAX))?
                    .map(|e| e.map(|(k, _)| k.value().1))
                    .collect::<Result<_, _>>()?;
                for to in epochs {
                    frags.remove((key.as_slice(), to))?;
                }
            }
        }
        tx.commit()?;
        Ok(removed)
    }

    /// A stored blob with its fragments to `to_epoch`.
    pub fn get(&self, cid: &ContentId, to_epoch: u64) -> Result<Option<StoredBlob>, StorageError> {
        let key = cid.to_bytes();
        let tx = self.db.begin_read()?;
        let Some(blob) = tx.open_table(BLOBS)?.get(key.as_slice())? else {
            return Ok(None);
        };
        let sealed = tx
            .open_table(SEALED)?
            .get(key.as_slice())?
            .ok_or_else(|| StorageError::Store(format!("blob {cid} has no sealed key")))?;
        let cfrags = tx
            .open_table(CFRAGS)?
            .get((key.as_slice(), to_epoch))?
            .map(|v| v.value().chunks(CFRAG_BYTES).map(<[u8]>::to_vec).collect())
            .unwrap_or_default();
        Ok(Some(StoredBlob {
            blob: blob.value().to_vec(),
            sealed_key: sealed.value().to_vec(),
            cfrags,
        }))
    }

    /// Every stored sealed key of identity epoch `epoch`, with its blob's CID.
    pub fn sealed_keys_of(
        &self,
        epoch: u64,
    ) -> Result<Vec<(ContentId, SealedContentKey)>, StorageError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SEALED)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (cid, sealed) = entry?;
            // The epoch leads the encoding, so keys of other epochs are skipped undecoded.
            if sealed.value().get(..8) != Some(epoch.to_be_bytes().as_slice()) {
                continue;
            }
            let cid = ContentId::from_bytes(cid.value())
                .map_err(|e| StorageError::Store(format!("a stored CID: {e}")))?;
            let sealed = SealedContentKey::from_bytes(sealed.value())
                .map_err(|e| StorageError::Store(format!("a stored sealed key: {e}")))?;
            out.push((cid, sealed));
        }
        Ok(out)
    }

    /// Stores the fragments of one applied set `(from, to)` and marks it applied, atomically.
    pub fn store_rekey(
        &self,
        from: u64,
        to: u64,
        cfrags: &[(ContentId, Vec<Vec<u8>>)],
    ) -> Result<(), StorageError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(CFRAGS)?;
            for (cid, frags) in cfrags {
                table.insert((cid.to_bytes().as_slice(), to), frags.concat().as_slice())?;
            }
            tx.open_table(REKEYED)?.insert((from, to), ())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The fragment sets applied so far.
    pub fn applied_rekeys(&self) -> Result<BTreeSet<(u64, u64)>, StorageError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(REKEYED)?;
        let mut out = BTreeSet::new();
        for entry in table.iter()? {
            out.insert(entry?.0.value());
        }
        Ok(out)
    }

    /// How many blobs are stored.
    pub fn blob_count(&self) -> Result<u64, StorageError> {
        use redb::ReadableTableMetadata;
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(BLOBS)?.len()?)
    }
}
