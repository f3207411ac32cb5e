//! Device homes driven together in one process: authority creation (DKG) and snapshot
//! ceremonies among them, over their real stores and key files.
//!
//! Until ceremony messages travel over the network, this is how the CLI (with
//! `--member-home`) and `devnet` run them; the ceremony state machine is the same one a
//! networked device runs, it only sees messages and a journal view.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::{CryptoRng, RngCore};
use tend_core::maintenance::SnapshotCompleted;
use tend_core::{ContentId, DeviceId, Epoch, FactId, GroupKey, JournalNamespace, MaintenanceEpoch};
use tend_crypto::dkg::run_in_memory;
use tend_crypto::share::KeyShare;
use tend_replica::keygen::{self, KeyGenError, KeyGenPlan};
use tend_replica::EngineView;
use tend_snapshot::{
    CeremonyAction, CeremonyEvent, CeremonyInput, LocalJournal, Recipient, Refusal, SignerKey,
    SnapshotEngine,
};
use tend_store::StoreError;

use crate::device::{Device, DeviceError};
use crate::replica::DeviceReplica;
pub use crate::snapshot_blob::StoreJournal;

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("key generation failed: {0}")]
    Dkg(String),
    #[error("invalid authority shape: {0}")]
    Shape(String),
    #[error(transparent)]
    KeyGen(#[from] KeyGenError),
    #[error("snapshot ceremony did not complete: {0}")]
    Ceremony(String),
}

/// What `create_authority` did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AuthorityCreated {
    pub namespace: String,
    pub identity_epoch: u64,
    pub threshold: u16,
    pub members: Vec<String>,
    pub group_key: String,
}

/// Several device homes, opened in this process. Device 0 is the admin.
pub struct LocalFleet {
    devices: Vec<Arc<Device>>,
    engines: Vec<SnapshotEngine>,
    /// The engines' clock: a millisecond per input (nothing here waits).
    now: Duration,
}

impl LocalFleet {
    /// Drives `devices` (shared with running nodes, if any); the first is the admin whose
    /// authority the others join.
    pub fn new(devices: Vec<Arc<Device>>) -> Self {
        let engines = devices
            .iter()
            .map(|d| SnapshotEngine::new(d.device_id()))
            .collect();
        Self {
            devices,
            engines,
            now: Duration::ZERO,
        }
    }

    pub fn devices(&self) -> &[Arc<Device>] {
        &self.devices
    }

    pub fn into_devices(self) -> Vec<Arc<Device>> {
        self.devices
    }

    /// Makes the admin's authority an authority of every device in the fleet with
    /// `threshold`: a DKG among all of them (each share saved 0600 in its own home), a
    /// `MembershipChange` by the admin (identity epoch + 1), and every device adopting the
    /// admin's journal.
    pub fn create_authority(
        &mut self,
        threshold: u16,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<AuthorityCreated, FleetError> {
        let admin = &self.devices[0];
        let namespace = admin.namespace();
        let ids: Vec<DeviceId> = self.devices.iter().map(|d| d.device_id()).collect();
        if ids.iter().collect::<HashSet<_>>().len() != ids.len() {
            return Err(FleetError::Shape("the same device was given twice".into()));
        }
        // Key generation runs at one maintenance epoch (ARCHITECTURE section 10):
        // copying the journal between the devices first settles any difference.
        let mut state = admin.store().maintenance_state(namespace)?;
        let mut plan = KeyGenPlan::new(&state, namespace, ids[0], &ids, threshold)?;
        if self.epoch_laggard(namespace, plan.epoch)?.is_some() {
            self.sync()?;
            state = self.devices[0].store().maintenance_state(namespace)?;
            plan = KeyGenPlan::new(&state, namespace, ids[0], &ids, threshold)?;
            if let Some((member, theirs)) = self.epoch_laggard(namespace, plan.epoch)? {
                return Err(KeyGenError::MemberAtAnotherEpoch {
                    member,
                    theirs,
                    ours: plan.epoch,
                }
                .into());
            }
        }
        let session = &plan.session;
        let shares = run_in_memory(session, rng).map_err(|e| FleetError::Dkg(e.to_string()))?;
        let group_key: GroupKey = shares[0].group_key();
        for share in &shares {
            let home = self
                .devices
                .iter()
                .find(|d| d.device_id() == share.device_id())
                .map(|d| d.home().to_owned())
                .ok_or_else(|| FleetError::Dkg("a share for an unknown device".into()))?;
            share
                .save(&home)
                .map_err(|e| FleetError::Dkg(e.to_string()))?;
        }
        self.devices[0].append(plan.membership_change(group_key))?;
        // The admin keys the new epoch for the vault if the authority uses one (section 14);
        // the change stands either way, and `tend vault key` can do it later.
        if let Err(e) = crate::vault_peer::key_epoch_if_enabled(&self.devices[0]) {
            tracing::warn!("the new identity epoch has no vault key yet: {e}");
        }
        for d in &self.devices[1..] {
            d.adopt_namespace(namespace)?;
        }
        self.sync()?;
        Ok(AuthorityCreated {
            namespace: namespace.to_string(),
            identity_epoch: session.identity_epoch,
            threshold,
            members: session.members.iter().map(ToString::to_string).collect(),
            group_key: hex::encode(group_key.0),
        })
    }

    /// A device of the admin's journal at another maintenance epoch than `admin_epoch`,
    /// with its epoch.
    fn epoch_laggard(
        &self,
        namespace: JournalNamespace,
        admin_epoch: MaintenanceEpoch,
    ) -> Result<Option<(DeviceId, MaintenanceEpoch)>, FleetError> {
        let mut epochs = Vec::new();
        for d in &self.devices[1..] {
            let theirs = (d.namespace() == namespace)
                .then(|| d.store().maintenance_state(namespace))
                .transpose()?
                .map(|s| s.maintenance_epoch());
            epochs.push((d.device_id(), theirs));
        }
        Ok(keygen::laggard(admin_epoch, epochs))
    }

    /// Copies every fact and blob of the admin's namespace between all devices (set union).
    /// Returns the number of facts newly stored.
    pub fn sync(&self) -> Result<u64, FleetError> {
        let ns = self.devices[0].namespace();
        // Journals that already agree (the usual case around a ceremony) cost one keys-only
        // scan each. Otherwise each store's keys are read once, and each store takes only
        // the facts it lacks, read by key from one holder and verified: copying every
        // fact into every store checked a signature per fact and device (minutes at a
        // million facts), and scanning every source's journal for every destination, at
        // every fact a ceremony writes, took 4.3 s for 20 devices (under 1 s now).
        let mut digests = Vec::with_capacity(self.devices.len());
        for d in &self.devices {
            digests.push(d.store().journal_digest(ns)?);
        }
        let mut inserted = 0;
        if !digests.windows(2).all(|w| w[0] == w[1]) {
            let mut held = Vec::with_capacity(self.devices.len());
            for d in &self.devices {
                held.push(
                    d.store()
                        .items(ns, ..)?
                        .collect::<Result<HashSet<_>, _>>()?,
                );
            }
            let mut holder: BTreeMap<(Epoch, FactId), usize> = BTreeMap::new();
            for (i, keys) in held.iter().enumerate() {
                for key in keys {
                    holder.entry(*key).or_insert(i);
                }
            }
            for (to, dest) in self.devices.iter().enumerate() {
                let lacking: Vec<_> = holder
                    .iter()
                    .filter(|(key, _)| !held[to].contains(key))
                    .collect();
                // In batches, so a store that lacks a whole journal is not copied in one.
                for batch in lacking.chunks(10_000) {
                    let mut missing = Vec::with_capacity(batch.len());
                    for ((epoch, id), from) in batch {
                        let source = &self.devices[**from];
                        if let Some(stored) = source.store().get(ns, *epoch, id)? {
                            missing.push(verify(source, &stored)?);
                        }
                    }
                    inserted += dest.store().insert_batch(&missing)?.inserted;
                }
            }
        }
        let mut blobs = Vec::with_capacity(self.devices.len());
        for d in &self.devices {
            let cids: HashSet<ContentId> = d.store().blobs()?.into_iter().map(|(c, _)| c).collect();
            blobs.push(cids);
        }
        for (to, dest) in self.devices.iter().enumerate() {
            let mut copied = HashSet::new();
            for (from, source) in self.devices.iter().enumerate() {
                for cid in blobs[from].difference(&blobs[to]) {
                    if copied.insert(*cid) {
                        if let Some(bytes) = source.store().get_blob(cid)? {
                            dest.store().put_blob(cid.codec(), &bytes)?;
                        }
                    }
                }
            }
        }
        Ok(inserted)
    }

    /// Runs a snapshot ceremony proposed by device `proposer` for `target_epoch` (or a
    /// later one) and returns the completed snapshot; every device has it (and the blob)
    /// afterwards.
    ///
    /// The devices may belong to running nodes, which write facts of their own (metadata,
    /// settlement) at any moment: one written below the target after the proposer
    /// digested its prefix makes members refuse with a digest mismatch. Then the devices
    /// sync and the proposer proposes again, at a new target (a member votes once per
    /// target), up to three times, as a running node's `propose_snapshot` does.
    pub fn snapshot(
        &mut self,
        proposer: usize,
        target_epoch: Epoch,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<SnapshotCompleted, FleetError> {
        const ATTEMPTS: usize = 3;
        let mut target = target_epoch;
        let mut attempt = 1;
        loop {
            match self.snapshot_once(proposer, target, rng)? {
                Ok(completed) => return Ok(completed),
                Err((refusals, prefix_differs)) if prefix_differs && attempt < ATTEMPTS => {
                    attempt += 1;
                    tracing::info!(
                        "snapshot proposal refused ({refusals}); syncing and proposing again"
                    );
                    let state = self.devices[proposer]
                        .store()
                        .maintenance_state(self.devices[proposer].namespace())?;
                    target = target.next().max(state.current_epoch().next());
                }
                Err((refusals, _)) => return Err(FleetError::Ceremony(refusals)),
            }
        }
    }

    /// One proposal: the completion, or the refusals and whether a member's prefix differed.
    fn snapshot_once(
        &mut self,
        proposer: usize,
        target_epoch: Epoch,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Result<SnapshotCompleted, (String, bool)>, FleetError> {
        // Devices agree on a prefix only after they exchanged their facts.
        self.sync()?;
        self.install_keys(rng)?;
        // Each member's votes, as its running node would hold them.
        for (d, engine) in self.devices.iter().zip(&mut self.engines) {
            crate::votes::restore(d.store(), engine)?;
        }
        let mut queue: VecDeque<(usize, CeremonyInput)> = VecDeque::new();
        queue.push_back((
            proposer,
            CeremonyInput::Propose {
                target_epoch,
                timeout_ms: 30_000,
            },
        ));
        let mut completed = None;
        let mut refusals = Vec::new();
        let mut prefix_differs = false;
        while let Some((i, input)) = queue.pop_front() {
            self.now += Duration::from_millis(1);
            let outputs = {
                let replica = DeviceReplica::new(&self.devices[i]);
                let view = EngineView::new(&replica)?;
                self.engines[i].handle(self.now, &view, input, rng)
            };
            let me = self.devices[i].device_id();
            for out in outputs {
                match out {
                    CeremonyAction::Send { to, message } => {
                        let bytes = message.to_bytes();
                        for j in 0..self.devices.len() {
                            let wanted = match to {
                                Recipient::All => j != i,
                                Recipient::Device(d) => self.devices[j].device_id() == d,
                            };
                            if wanted {
                                queue.push_back((
                                    j,
                                    CeremonyInput::Message {
                                        from: me,
                                        bytes: bytes.clone(),
                                    },
                                ));
                            }
                        }
                    }
                    CeremonyAction::WriteFact(f) => {
                        self.devices[i].write(f)?;
                        // Proposals and completions reach the others as sync would, with
                        // whatever the devices wrote meanwhile (running nodes advertise
                        // their metadata, say): the members check the proposer's prefix.
                        self.sync()?;
                    }
                    CeremonyAction::StoreBlob { cid, bytes } => {
                        self.devices[i].store().put_blob(cid.codec(), &bytes)?;
                    }
                    CeremonyAction::SaveVotes(votes) => {
                        crate::votes::save(self.devices[i].store(), &votes)?;
                    }
                    CeremonyAction::Event(CeremonyEvent::Completed(c)) => completed = Some(c),
                    CeremonyAction::Event(
                        CeremonyEvent::Refused { reason, .. }
                        | CeremonyEvent::PeerRefused { reason, .. }
                        | CeremonyEvent::ProposalRejected { reason, .. },
                    ) => {
                        prefix_differs |= matches!(reason, Refusal::DigestMismatch { .. });
                        refusals.push(format!("{reason:?}"))
                    }
                    CeremonyAction::Event(CeremonyEvent::Aborted { reason, .. }) => {
                        refusals.push(format!("aborted: {reason:?}"))
                    }
                    CeremonyAction::Event(_) => {}
                }
            }
        }
        self.sync()?;
        Ok(completed.ok_or_else(|| {
            let refusals = if refusals.is_empty() {
                "not enough signature shares".into()
            } else {
                refusals.join("; ")
            };
            (refusals, prefix_differs)
        }))
    }

    /// Gives every engine the key for the current identity epoch: the FROST share from the
    /// device's home, or the device key for a one-device authority.
    fn install_keys(&mut self, rng: &mut (impl RngCore + CryptoRng)) -> Result<(), FleetError> {
        for i in 0..self.devices.len() {
            let d = &self.devices[i];
            let replica = DeviceReplica::new(d);
            let view = EngineView::new(&replica)?;
            let identity_epoch = view.state().identity_epoch();
            let single = view
                .state()
                .membership()
                .is_some_and(|m| m.members.len() == 1);
            let key = if single {
                SignerKey::Single {
                    identity_epoch,
                    key: d.key().signing_key().clone(),
                }
            } else {
                let share = KeyShare::load(d.home(), identity_epoch)
                    .map_err(|e| FleetError::Dkg(e.to_string()))?;
                SignerKey::Frost(share)
            };
            self.engines[i].handle(self.now, &view, CeremonyInput::InstallKey(key), rng);
        }
        Ok(())
    }
}

fn verify(d: &Device, s: &tend_store::StoredFact) -> Result<tend_core::VerifiedFact, FleetError> {
    s.verify().map_err(|source| {
        FleetError::Store(StoreError::FactCorrupt {
            path: d.store().path().to_owned(),
            source,
        })
    })
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::votes::restore;

    /// A ceremony the in-process fleet runs on stopped homes records each signer's vote
    /// in its store, where the running node's engine (or a later fleet) restores it from.
    #[test]
    fn votes_cast_by_the_fleet_are_kept_in_each_members_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let devices: Vec<Arc<Device>> = ["a", "b"]
            .iter()
            .map(|n| Arc::new(Device::init(&dir.path().join(n), &mut rng).unwrap()))
            .collect();
        let mut fleet = LocalFleet::new(devices.clone());
        fleet.create_authority(2, &mut rng).unwrap();
        devices[0].add_application_fact("note", b"x").unwrap();
        let target = Epoch(devices[0].snapshot_status().unwrap().current_epoch + 1);
        let done = fleet.snapshot(0, target, &mut rng).unwrap();
        for d in &devices {
            let mut fresh = SnapshotEngine::new(d.device_id());
            restore(d.store(), &mut fresh).unwrap();
            assert_eq!(
                fresh.votes().get(&target),
                Some(&done.snapshot.digest),
                "device {} lost its vote",
                d.device_id()
            );
        }
    }

    /// The fleet's sync is a set union: every device ends with every fact and blob that
    /// any of them held, each fact checked, none lost or doubled.
    #[test]
    fn sync_gives_every_device_the_union_of_facts_and_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let devices: Vec<Arc<Device>> = ["a", "b", "c"]
            .iter()
            .map(|n| Arc::new(Device::init(&dir.path().join(n), &mut rng).unwrap()))
            .collect();
        let mut fleet = LocalFleet::new(devices.clone());
        fleet.create_authority(2, &mut rng).unwrap();
        for (i, d) in devices.iter().enumerate() {
            for n in 0..=i {
                d.add_application_fact("note", format!("{i}/{n}").as_bytes())
                    .unwrap();
            }
        }
        let cid = devices[2]
            .store()
            .put_blob(tend_core::ids::CODEC_RAW, b"a large value")
            .unwrap();
        let ns = devices[0].namespace();
        let total: u64 = devices
            .iter()
            .map(|d| d.store().stats(ns).unwrap().map_or(0, |s| s.facts))
            .sum();
        let inserted = fleet.sync().unwrap();
        let digests: Vec<_> = devices
            .iter()
            .map(|d| d.store().journal_digest(ns).unwrap())
            .collect();
        assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
        let each = devices[0].store().stats(ns).unwrap().map_or(0, |s| s.facts);
        // Each device took exactly the facts it lacked.
        assert_eq!(inserted, 3 * each - total);
        for d in &devices {
            assert_eq!(
                d.store().get_blob(&cid).unwrap().as_deref(),
                Some(&b"a large value"[..])
            );
        }
        assert_eq!(
            fleet.sync().unwrap(),
            0,
            "a second sync has nothing to copy"
        );
    }
}
