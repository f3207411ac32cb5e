//! Local settings: small typed values (JSON) under string keys, never replicated.

use redb::ReadableTable;
use serde::{de::DeserializeOwned, Serialize};

use crate::error::StoreError;
use crate::store::{Store, SETTINGS};

impl Store {
    /// The setting under `key`, decoded as `T`; `None` if unset.
    pub fn get_setting<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let rtx = self.read_txn()?;
        let t = self.open_ro(&rtx, SETTINGS)?;
        let Some(v) = t.get(key).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| StoreError::Setting {
                path: self.path.clone(),
                key: key.into(),
                detail: format!("cannot decode stored value: {e}"),
            })
    }

    /// Sets `key` to `value` (durably, in its own transaction).
    pub fn put_setting<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.put_setting_with(key, value, redb::Durability::Immediate)
    }

    /// Sets `key` to `value` without waiting for the disk: the next durable commit of this
    /// store (any write of facts, any [`Store::put_setting`]) persists it, and a crash
    /// before one loses it. For what is worth keeping but not an fsync each time (the
    /// peer table after every session).
    pub fn put_setting_unsynced<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.put_setting_with(key, value, redb::Durability::None)
    }

    fn put_setting_with<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        durability: redb::Durability,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Setting {
            path: self.path.clone(),
            key: key.into(),
            detail: format!("cannot encode value: {e}"),
        })?;
        let _writer = self.lock_writer();
        let mut tx = self.db().begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(durability).map_err(|e| self.err(e))?;
        tx.open_table(SETTINGS)
            .map_err(|e| self.err(e))?
            .insert(key, bytes.as_slice())
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Removes `key`; returns whether it was set.
    pub fn delete_setting(&self, key: &str) -> Result<bool, StoreError> {
        let _writer = self.lock_writer();
        let tx = self.db().begin_write().map_err(|e| self.err(e))?;
        let removed = tx
            .open_table(SETTINGS)
            .map_err(|e| self.err(e))?
            .remove(key)
            .map_err(|e| self.err(e))?
            .is_some();
        tx.commit().map_err(|e| self.err(e))?;
        Ok(removed)
    }

    /// The keys of every setting, in order.
    pub fn setting_keys(&self) -> Result<Vec<String>, StoreError> {
        let rtx = self.read_txn()?;
        let t = self.open_ro(&rtx, SETTINGS)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            out.push(k.value().to_owned());
        }
        Ok(out)
    }
}
