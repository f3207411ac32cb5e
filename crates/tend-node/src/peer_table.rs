//! The persisted peer table: each peer's score inputs, status, operator trust and last
//! successful sync, kept in the store's `peer_table` setting so they survive a restart,
//! and the trust of a peer's role in the authority.
//!
//! The running node writes the table after every session that changes it; a stopped
//! device's operator commands (`tend peers trust`, `ban`, `unban`) edit it in place.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use tend_core::{DeviceId, MaintenanceState};
use tend_store::{Store, StoreError};
use tend_sync::{PeerManager, PeerRecord, PeerStatus};

/// The setting that holds the table: a JSON map from device id (hex) to [`PeerRecord`].
pub const SETTING: &str = "peer_table";

/// Trust of the authority's admin, of another member, and of a device that is not (or
/// not yet known to be) a member. Members outrank strangers; the admin, whose facts every
/// device needs, outranks members.
pub const ADMIN_TRUST: f64 = 1.0;
pub const MEMBER_TRUST: f64 = 0.8;
pub const STRANGER_TRUST: f64 = 0.5;

/// An operator's trust figure as the control socket carries it. `Eq` so requests can
/// be compared: JSON has no NaN, so equality is reflexive for every value that arrives.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Trust(pub f64);

impl Eq for Trust {}

/// Why an operator's change to the table was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerTableError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("trust must be a number from 0 to 1, not {0}")]
    BadTrust(f64),
    #[error("no peer {0} in this device's peer table")]
    UnknownPeer(DeviceId),
    #[error("bad device id {0:?}: {1}")]
    BadDevice(String, String),
}

/// Parses a device id given by an operator.
pub fn parse_device(s: &str) -> Result<DeviceId, PeerTableError> {
    s.parse().map_err(|e: tend_core::ids::ParseIdError| {
        PeerTableError::BadDevice(s.into(), e.to_string())
    })
}

/// The trust of `device`'s role in the authority as `state` has it.
pub fn role_trust(state: &MaintenanceState, device: &DeviceId) -> f64 {
    let epoch = state.current_epoch();
    if state.is_admin_at(device, epoch) {
        ADMIN_TRUST
    } else if state
        .membership()
        .is_some_and(|m| m.members.contains(device))
    {
        MEMBER_TRUST
    } else {
        STRANGER_TRUST
    }
}

/// The stored table. An unreadable table (written by a newer release, damaged) is
/// reported and replaced by an empty one rather than keeping the device from starting.
pub fn load(store: &Store) -> Result<BTreeMap<DeviceId, PeerRecord>, StoreError> {
    let raw: Option<BTreeMap<String, PeerRecord>> = match store.get_setting(SETTING) {
        Ok(r) => r,
        Err(StoreError::Setting { .. }) => {
            tracing::warn!("the stored peer table is unreadable: starting with scores afresh");
            None
        }
        Err(e) => return Err(e),
    };
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, r)| k.parse::<DeviceId>().ok().map(|d| (d, r)))
        .collect())
}

/// Writes every peer's record.
pub fn save(store: &Store, manager: &PeerManager) -> Result<(), StoreError> {
    save_records(store, manager.records(), true)
}

/// Writes the table from records taken out of a [`PeerManager`]; `durable: false` leaves it
/// for the store's next durable commit ([`Store::put_setting_unsynced`]).
pub fn save_records(
    store: &Store,
    records: Vec<(DeviceId, PeerRecord)>,
    durable: bool,
) -> Result<(), StoreError> {
    let table: BTreeMap<String, PeerRecord> = records
        .into_iter()
        .map(|(d, r)| (d.to_string(), r))
        .collect();
    match durable {
        true => store.put_setting(SETTING, &table),
        false => store.put_setting_unsynced(SETTING, &table),
    }
}

/// Checks an operator's trust figure.
pub fn check_trust(trust: Option<f64>) -> Result<Option<f64>, PeerTableError> {
    match trust {
        Some(t) if !(0.0..=1.0).contains(&t) => Err(PeerTableError::BadTrust(t)),
        other => Ok(other),
    }
}

/// Applies an operator's change to the stored table of a stopped device: its trust for
/// `device` (`None`: back to the role's), or a ban (`Some(true)`) or unban. A peer not
/// in the table is added, so an operator can ban a device before it ever connects.
pub fn edit_stored(
    store: &Store,
    state: &MaintenanceState,
    device: DeviceId,
    trust: Option<Option<f64>>,
    banned: Option<bool>,
) -> Result<tend_sync::PeerMetadata, PeerTableError> {
    let mut manager = PeerManager::new(tend_sync::PeerConfig::default());
    for (d, r) in load(store)? {
        manager.restore(d, role_trust(state, &d), &r);
    }
    manager.add(device, role_trust(state, &device));
    edit(&mut manager, &device, trust, banned)?;
    save(store, &manager)?;
    manager
        .get(&device)
        .cloned()
        .ok_or(PeerTableError::UnknownPeer(device))
}

/// Applies an operator's change to a peer manager (see [`edit_stored`]).
pub fn edit(
    manager: &mut PeerManager,
    device: &DeviceId,
    trust: Option<Option<f64>>,
    banned: Option<bool>,
) -> Result<(), PeerTableError> {
    if manager.get(device).is_none() {
        return Err(PeerTableError::UnknownPeer(*device));
    }
    if let Some(t) = trust {
        manager.set_operator_trust(device, check_trust(t)?);
    }
    match banned {
        Some(true) => manager.set_status(device, PeerStatus::Banned),
        Some(false) => manager.set_status(device, PeerStatus::Online),
        None => {}
    }
    Ok(())
}

/// Now as Unix milliseconds (0 if the clock is before 1970).
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
