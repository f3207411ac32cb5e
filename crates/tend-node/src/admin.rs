//! Admin replacement on a device (DESIGN rule 8): by the admin itself, or completed with
//! the authority's threshold signature among member homes when the admin is unavailable.
//! The rules that decide which replacement counts are in `tend_core::admin`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tend_core::maintenance::{AdminReplacement, CertifiedAdminReplacement, MaintenanceFact};
use tend_core::{DeviceId, Epoch, MaintenanceState, Payload, VerifiedFact};
use tend_crypto::share::KeyShare;

use crate::device::{Device, DeviceError};

/// Why an admin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Store(#[from] tend_store::StoreError),
    #[error("the journal has no admin yet (no authority genesis)")]
    NoAdmin,
    #[error("device {0} is not the admin; replace an unavailable admin with --threshold and the members' homes")]
    NotAdmin(DeviceId),
    #[error("invalid replacement: {0}")]
    Invalid(String),
    #[error("threshold signing failed: {0}")]
    Signing(String),
}

/// Checks a replacement against the state before writing it, so a mistake is an error
/// here rather than a fact the reducer silently ignores.
fn prepare(
    state: &MaintenanceState,
    old: Option<DeviceId>,
    new: DeviceId,
    at: Epoch,
) -> Result<AdminReplacement, AdminError> {
    let now = state.current_epoch();
    let admin = state.admin_at(now).ok_or(AdminError::NoAdmin)?;
    let old = old.unwrap_or(admin);
    if old != admin {
        return Err(AdminError::Invalid(format!(
            "{old} is not the admin at epoch {now} ({admin} is)"
        )));
    }
    if new == old {
        return Err(AdminError::Invalid(
            "the new admin is the current admin".into(),
        ));
    }
    if !state.is_member_at(&new, now.next()) {
        return Err(AdminError::Invalid(format!(
            "{new} is not a member of this authority"
        )));
    }
    if at <= now {
        return Err(AdminError::Invalid(format!(
            "--at-epoch {at} must be above the current epoch {now}"
        )));
    }
    if let Some(p) = state.pending_replacement(now) {
        return Err(AdminError::Invalid(format!(
            "a replacement of {old} by {} is already scheduled for epoch {}",
            p.replacement.new_admin, p.replacement.activation_epoch
        )));
    }
    Ok(AdminReplacement {
        old_admin: old,
        new_admin: new,
        activation_epoch: at,
    })
}

/// The admin hands over to `new` from epoch `at` (above the current epoch).
pub fn replace(device: &Device, new: DeviceId, at: Epoch) -> Result<VerifiedFact, AdminError> {
    let state = device.store().maintenance_state(device.namespace())?;
    let me = device.device_id();
    if !state.is_admin_at(&me, state.current_epoch()) {
        return Err(AdminError::NotAdmin(me));
    }
    let r = prepare(&state, Some(me), new, at)?;
    Ok(device.append(Payload::Maintenance(MaintenanceFact::AdminReplacement(r)))?)
}

/// Replaces the admin (`old`, default: the current one) without it: the member devices
/// in `devices` (their homes hold key shares of the current identity epoch; at least the
/// threshold of them) sign the replacement with FROST in this process, and `devices[0]`
/// writes the certified fact.
pub fn replace_with_threshold(
    devices: &[&Device],
    old: Option<DeviceId>,
    new: DeviceId,
    at: Epoch,
    rng: &mut (impl rand::RngCore + rand::CryptoRng),
) -> Result<VerifiedFact, AdminError> {
    let author = *devices
        .first()
        .ok_or_else(|| AdminError::Invalid("no device to write the replacement".into()))?;
    let ns = author.namespace();
    let state = author.store().maintenance_state(ns)?;
    let r = prepare(&state, old, new, at)?;
    let membership = state.membership().ok_or(AdminError::NoAdmin)?;
    let mut shares = Vec::new();
    for d in devices {
        if !membership.members.contains(&d.device_id()) {
            return Err(AdminError::Invalid(format!(
                "{} is not a member of this authority",
                d.device_id()
            )));
        }
        let share = KeyShare::load(d.home(), membership.identity_epoch)
            .map_err(|e| AdminError::Signing(e.to_string()))?;
        shares.push(share);
    }
    let need = usize::from(membership.threshold);
    if shares.len() < need {
        return Err(AdminError::Signing(format!(
            "{} member homes given, the threshold is {need}",
            shares.len()
        )));
    }
    shares.truncate(need);
    let msg = r.signing_message(&ns);
    let sig = threshold_sign(&shares, &msg, rng)?;
    if !membership.group_key.verify(&msg, &sig) {
        return Err(AdminError::Signing(
            "the signature does not verify against the authority's group key".into(),
        ));
    }
    let c = CertifiedAdminReplacement {
        replacement: r,
        threshold_signature: sig,
    };
    Ok(author.append(Payload::Maintenance(
        MaintenanceFact::CertifiedAdminReplacement(c),
    ))?)
}

/// FROST signing among shares held in this process.
fn threshold_sign(
    shares: &[KeyShare],
    msg: &[u8],
    rng: &mut (impl rand::RngCore + rand::CryptoRng),
) -> Result<[u8; 64], AdminError> {
    use tend_crypto::sign;
    let err = |e: sign::SignError| AdminError::Signing(e.to_string());
    let mut nonces = Vec::new();
    let mut commitments = BTreeMap::new();
    for s in shares {
        let (n, c) = sign::commit(s, rng);
        nonces.push(n);
        commitments.insert(s.device_id(), c);
    }
    let mut sig_shares = BTreeMap::new();
    for (s, n) in shares.iter().zip(nonces) {
        sig_shares.insert(
            s.device_id(),
            sign::sign_share(s, n, &commitments, msg).map_err(err)?,
        );
    }
    let public = shares
        .first()
        .ok_or_else(|| AdminError::Signing("no key share".into()))?
        .public_shares();
    sign::aggregate(&public, &commitments, &sig_shares, msg).map_err(err)
}

/// One replacement that took effect.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplacementSummary {
    pub old_admin: String,
    pub new_admin: String,
    pub activation_epoch: u64,
    pub certified: bool,
    pub in_effect: bool,
    pub fact_id: String,
}

/// The admin and its replacements, as `tend admin status` shows them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdminStatus {
    pub current_epoch: u64,
    pub admin: Option<String>,
    pub initial_admin: Option<String>,
    pub replacements: Vec<ReplacementSummary>,
    /// Facts kept as evidence but ignored by reduction (retired admins' operations,
    /// losing replacements, ...).
    pub ignored_facts: usize,
}

/// The current admin, the replacement chain and how many facts reduction ignored.
pub fn status(device: &Device) -> Result<AdminStatus, AdminError> {
    let state = device.store().maintenance_state(device.namespace())?;
    let now = state.current_epoch();
    let mut replacements: Vec<ReplacementSummary> = state
        .replacements
        .iter()
        .map(|a| ReplacementSummary {
            old_admin: a.replacement.old_admin.to_string(),
            new_admin: a.replacement.new_admin.to_string(),
            activation_epoch: a.replacement.activation_epoch.0,
            certified: a.certified,
            in_effect: a.replacement.activation_epoch <= now,
            fact_id: a.fact_id.to_string(),
        })
        .collect();
    replacements.sort_by_key(|r| r.activation_epoch);
    Ok(AdminStatus {
        current_epoch: now.0,
        admin: state.admin_at(now).map(|a| a.to_string()),
        initial_admin: state.initial_admin.map(|a| a.to_string()),
        replacements,
        ignored_facts: state.ignored.len(),
    })
}
