//! Local cache validity (DESIGN rule 6): a persisted map key -> epoch floor on each device.
//!
//! Mutations publish `CacheInvalidated { keys, epoch_floor }`; every device folds the
//! journal's floors into a local map kept in the store's settings (`cache.floors`), and
//! may raise floors locally without publishing. A floor only ever rises: the map takes the
//! maximum of what it had, what the journal says and what is raised locally, so an older
//! invalidation arriving late never lowers it. An entry cached at epoch `e` under a key is
//! valid only when `e` exceeds the key's floor. No cache content is replicated.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tend_core::maintenance::{CacheInvalidated, MaintenanceFact};
use tend_core::{Epoch, MaintenanceState, Payload, VerifiedFact};

use crate::device::{Device, DeviceError};

/// Setting that holds the local map key -> floor (epochs as integers).
pub const FLOORS: &str = "cache.floors";
/// Longest accepted cache key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// The floors of every key this device knows.
pub type Floors = BTreeMap<String, Epoch>;

/// Raises the floor of each key to at least `floor`; returns whether anything changed.
pub fn raise<'a>(
    floors: &mut Floors,
    keys: impl IntoIterator<Item = &'a str>,
    floor: Epoch,
) -> bool {
    let mut changed = false;
    for k in keys {
        match floors.get_mut(k) {
            Some(f) if floor > *f => {
                *f = floor;
                changed = true;
            }
            Some(_) => {}
            None => {
                floors.insert(k.to_string(), floor);
                changed = true;
            }
        }
    }
    changed
}

/// Folds the reduced journal's floors into `floors`; returns whether anything changed.
pub fn merge_journal(floors: &mut Floors, state: &MaintenanceState) -> bool {
    let mut changed = false;
    for (k, f) in &state.cache_floors {
        changed |= raise(floors, [k.as_str()], *f);
    }
    changed
}

/// Rule 6: whether an entry cached at `cached_at` is valid under `floor`.
pub fn is_valid(floor: Option<Epoch>, cached_at: Epoch) -> bool {
    floor.is_none_or(|f| cached_at > f)
}

/// The device's local map, brought up to date with its journal (and persisted if that
/// raised anything).
pub fn floors(device: &Device) -> Result<Floors, DeviceError> {
    let stored: BTreeMap<String, u64> = device.store().get_setting(FLOORS)?.unwrap_or_default();
    let mut floors: Floors = stored.into_iter().map(|(k, e)| (k, Epoch(e))).collect();
    let state = device.store().maintenance_state(device.namespace())?;
    if merge_journal(&mut floors, &state) {
        save(device, &floors)?;
    }
    Ok(floors)
}

fn save(device: &Device, floors: &Floors) -> Result<(), DeviceError> {
    let plain: BTreeMap<&str, u64> = floors.iter().map(|(k, e)| (k.as_str(), e.0)).collect();
    Ok(device.store().put_setting(FLOORS, &plain)?)
}

fn check_keys(keys: &[String]) -> Result<(), DeviceError> {
    if keys.is_empty() {
        return Err(DeviceError::InvalidInput("give at least one --key".into()));
    }
    for k in keys {
        if k.is_empty() || k.len() > MAX_KEY_BYTES || k.chars().any(char::is_control) {
            return Err(DeviceError::InvalidInput(format!(
                "cache key {k:?} must be 1 to {MAX_KEY_BYTES} bytes of printable text"
            )));
        }
    }
    Ok(())
}

/// What an invalidation did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Invalidation {
    /// The `CacheInvalidated` fact, when published.
    pub fact_id: Option<String>,
    pub fact_epoch: Option<u64>,
    pub epoch_floor: u64,
    /// Each key's floor afterwards (at least `epoch_floor`).
    pub floors: BTreeMap<String, u64>,
}

/// Publishes `CacheInvalidated { keys, floor }` (default floor: the current epoch, so
/// entries cached up to now are stale) and raises the local floors. A floor above the
/// current epoch is refused: it would invalidate entries not yet written.
pub fn invalidate(
    device: &Device,
    keys: &[String],
    floor: Option<Epoch>,
) -> Result<(VerifiedFact, Invalidation), DeviceError> {
    check_keys(keys)?;
    let state = device.store().maintenance_state(device.namespace())?;
    let current = state.current_epoch();
    let floor = floor.unwrap_or(current);
    if floor > current {
        return Err(DeviceError::InvalidInput(format!(
            "--floor {floor} is above the current epoch {current}"
        )));
    }
    let mut keys = keys.to_vec();
    keys.sort();
    keys.dedup();
    let fact = device.append(Payload::Maintenance(MaintenanceFact::CacheInvalidated(
        CacheInvalidated {
            keys: keys.clone(),
            epoch_floor: floor,
        },
    )))?;
    let mut map = floors(device)?;
    if raise(&mut map, keys.iter().map(String::as_str), floor) {
        save(device, &map)?;
    }
    let report = Invalidation {
        fact_id: Some(fact.id().to_string()),
        fact_epoch: Some(fact.epoch().0),
        epoch_floor: floor.0,
        floors: keys
            .iter()
            .map(|k| (k.clone(), map.get(k).map_or(0, |e| e.0)))
            .collect(),
    };
    Ok((fact, report))
}

/// Raises floors on this device only, without publishing (e.g. a local write the rest of
/// the fleet does not cache).
pub fn invalidate_local(
    device: &Device,
    keys: &[String],
    floor: Epoch,
) -> Result<Invalidation, DeviceError> {
    check_keys(keys)?;
    let mut map = floors(device)?;
    if raise(&mut map, keys.iter().map(String::as_str), floor) {
        save(device, &map)?;
    }
    Ok(Invalidation {
        fact_id: None,
        fact_epoch: None,
        epoch_floor: floor.0,
        floors: keys
            .iter()
            .map(|k| (k.clone(), map.get(k).map_or(0, |e| e.0)))
            .collect(),
    })
}

/// The answer to "is an entry cached at `cached_at` under `key` still valid?".
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheCheck {
    pub key: String,
    pub cached_at: u64,
    /// `None` when the key was never invalidated.
    pub floor: Option<u64>,
    pub valid: bool,
}

/// Whether an entry cached at `cached_at` under `key` is still valid on this device.
pub fn check(device: &Device, key: &str, cached_at: Epoch) -> Result<CacheCheck, DeviceError> {
    let floor = floors(device)?.get(key).copied();
    Ok(CacheCheck {
        key: key.to_string(),
        cached_at: cached_at.0,
        floor: floor.map(|e| e.0),
        valid: is_valid(floor, cached_at),
    })
}
