//! Device homes driven together in one process: authority creation (DKG) and snapshot
//! ceremonies among them, over their real stores and key files.
//!
//! Until ceremony messages travel over the network, this is how the CLI (with
//! `--member-home`) and `devnet` run them; the ceremony state machine is the same one a
//! networked device runs, it only sees messages and a journal view.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use rand::{CryptoRng, RngCore};
use tend_core::ids::CODEC_DAG_CBOR;
use tend_core::maintenance::SnapshotCompleted;
use tend_core::{
    reduce, ContentId, DeviceId, Epoch, FactId, GroupKey, Hash32, JournalNamespace,
    MaintenanceEpoch, MaintenanceState,
};
use tend_crypto::dkg::run_in_memory;
use tend_crypto::share::KeyShare;
use tend_replica::keygen::{self, KeyGenError, KeyGenPlan};
use tend_snapshot::blob::{read_item_blob, write_blob, write_item_blob, BlobHead, ItemRef};
use tend_snapshot::{
    BuiltBlob, CeremonyAction, CeremonyEvent, CeremonyInput, LocalJournal, Recipient, SignerKey,
    SnapshotBlob, SnapshotEngine,
};
use tend_store::{Store, StoreError};

use crate::blobs::{ScratchBlob, ScratchKind};
use crate::device::{Device, DeviceError};

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

/// A store-backed view of one device's journal for the ceremony engine.
pub struct StoreJournal<'a> {
    store: &'a Store,
    namespace: JournalNamespace,
    state: MaintenanceState,
}

impl<'a> StoreJournal<'a> {
    /// Reads the device's reduced state once.
    pub fn new(store: &'a Store, namespace: JournalNamespace) -> Result<Self, StoreError> {
        let state = store.maintenance_state(namespace)?;
        Ok(Self {
            store,
            namespace,
            state,
        })
    }

    /// The snapshot blob of the prefix below `upto`, decoded, with the items of its item
    /// blob (tests and benchmarks; the ceremony streams both with
    /// [`StoreJournal::write_item_blob`] and [`StoreJournal::write_snapshot_blob`]).
    pub fn try_snapshot_blob(&self, upto: Epoch) -> Result<SnapshotBlob, StoreError> {
        let corrupt = |e: tend_snapshot::BlobError| StoreError::Corrupt {
            path: self.store.path().to_owned(),
            detail: format!("the snapshot blob built from it does not decode: {e}"),
        };
        let mut items = Vec::new();
        let item_ref = self.write_item_blob(upto, &mut items)?;
        let mut bytes = Vec::new();
        self.write_snapshot_blob(upto, &item_ref, &mut bytes)?;
        let mut blob = SnapshotBlob::decode(&bytes).map_err(corrupt)?;
        blob.items = read_item_blob(&items[..], self.namespace, upto, blob.base, &item_ref)
            .map_err(corrupt)?;
        Ok(blob)
    }

    /// The prefix's state facts below `upto` and the base its digest chains on.
    fn state_facts(
        &self,
        upto: Epoch,
    ) -> Result<
        (
            Vec<tend_core::VerifiedFact>,
            Option<tend_core::SnapshotBase>,
        ),
        StoreError,
    > {
        let corrupt = |source| StoreError::FactCorrupt {
            path: self.store.path().to_owned(),
            source,
        };
        let mut state_facts = Vec::new();
        for stored in self.store.scan_maintenance(self.namespace)? {
            let stored = stored?;
            if stored.epoch >= upto {
                break;
            }
            state_facts.push(stored.trusted().map_err(corrupt)?);
        }
        let base = reduce(self.namespace, &state_facts).snapshot_base(upto);
        Ok((state_facts, base))
    }

    /// Writes the item blob of the prefix below `upto` to `out` (every `(epoch, id)` from
    /// the base on, one key-only scan of the index) and returns the reference the snapshot
    /// blob keeps of it.
    pub fn write_item_blob(
        &self,
        upto: Epoch,
        out: &mut impl Write,
    ) -> Result<ItemRef, StoreError> {
        let ns = self.namespace;
        let (_, base) = self.state_facts(upto)?;
        let from = base.map_or(Epoch::ZERO, |b| b.epoch);
        let mut count = 0u64;
        for item in self.store.items(ns, from..upto)? {
            item?;
            count += 1;
        }
        let items = self.store.items(ns, from..upto)?;
        write_item_blob::<BuildError>(
            out,
            ns,
            upto,
            base,
            count,
            items.map(|r| r.map_err(BuildError::from)),
        )
        .map_err(|e| self.build_error(e))
    }

    fn build_error(&self, e: BuildError) -> StoreError {
        match e {
            BuildError::Store(e) => e,
            BuildError::Io(source) => StoreError::Io {
                path: self.store.path().to_owned(),
                source,
            },
        }
    }

    /// Writes the snapshot blob of the prefix below `upto`, naming the item blob
    /// `item_ref` ([`StoreJournal::write_item_blob`]), to `out` as the store's index streams
    /// by: the prefix's state facts and live application facts as their stored canonical
    /// bytes, none of them decoded but the state facts. Memory holds the state facts and
    /// the live set's keys, not the blob.
    pub fn write_snapshot_blob(
        &self,
        upto: Epoch,
        item_ref: &ItemRef,
        out: &mut impl Write,
    ) -> Result<(), StoreError> {
        let ns = self.namespace;
        let (state_facts, base) = self.state_facts(upto)?;
        let live = self.store.live_below(ns, upto)?;
        // The state digest as `SnapshotBlob::from_parts` derives it.
        let mut state = reduce(ns, &state_facts);
        if let Some(e) = item_ref
            .last
            .map(|(e, _)| e)
            .max(live.last().map(|(e, _)| *e))
        {
            state.observe_epoch(e);
        }
        let head = BlobHead {
            namespace: ns,
            epoch: upto,
            base,
            item_ref: *item_ref,
            facts: (state_facts.len() + live.len()) as u64,
            state_digest: state.state_digest(),
        };
        // The facts in `(epoch, id)` order: the state facts merged into one scan of the
        // prefix that keeps the live application facts.
        let mut state_facts = state_facts.into_iter().peekable();
        let mut scan = self
            .store
            .scan(ns, ..upto)?
            .filter(|r| r.as_ref().map_or(true, |f| live.contains(&(f.epoch, f.id))));
        let mut next_live = scan.next();
        let facts = std::iter::from_fn(|| {
            let live_key = match &next_live {
                Some(Ok(f)) => Some((f.epoch, f.id)),
                Some(Err(_)) => return next_live.take().map(|r| r.map(|f| f.into_bytes())),
                None => None,
            };
            let state_first = match (state_facts.peek(), live_key) {
                (Some(s), Some(l)) => s.order_key() < l,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if state_first {
                state_facts.next().map(|f| Ok(f.bytes().to_vec()))
            } else {
                let this = next_live.take();
                next_live = scan.next();
                this.map(|r| r.map(|f| f.into_bytes()))
            }
        });
        write_blob::<BuildError, _>(out, &head, facts.map(|r| r.map_err(BuildError::from)))
            .map_err(|e| self.build_error(e))
    }

    /// Builds the item blob and the snapshot blob as [`StoreJournal::write_item_blob`] and
    /// [`StoreJournal::write_snapshot_blob`] do, each in one pass into a [`ScratchBlob`]
    /// beside the store, hashed for its CID as it is written; if they are to be kept and
    /// are not stored yet, they are copied into the store (the item blob first, so a
    /// device holding a snapshot blob it built holds its items too). Memory holds a copy
    /// buffer, not the blobs.
    fn build_and_keep(
        &self,
        upto: Epoch,
        keep: Option<ContentId>,
    ) -> Result<ContentId, StoreError> {
        let mut items = ScratchBlob::create(self.store, ScratchKind::Built)?;
        let item_ref = self.write_item_blob(upto, &mut items)?;
        let items_cid = items.finish(CODEC_DAG_CBOR)?;
        if items_cid != item_ref.cid {
            return Err(StoreError::Corrupt {
                path: self.store.path().to_owned(),
                detail: "the item blob's bytes do not hash to its reference".into(),
            });
        }
        let mut scratch = ScratchBlob::create(self.store, ScratchKind::Built)?;
        self.write_snapshot_blob(upto, &item_ref, &mut scratch)?;
        let cid = scratch.finish(CODEC_DAG_CBOR)?;
        if keep.is_none_or(|k| k == cid) {
            if !self.store.has_blob(&items_cid)? {
                items.store_as(self.store, &items_cid)?;
            }
            if !self.store.has_blob(&cid)? {
                scratch.store_as(self.store, &cid)?;
            }
        }
        Ok(cid)
    }
}

/// Why streaming a blob failed: reading the store or writing the bytes.
enum BuildError {
    Store(StoreError),
    Io(std::io::Error),
}

impl From<StoreError> for BuildError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<std::io::Error> for BuildError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

impl LocalJournal for StoreJournal<'_> {
    fn state(&self) -> &MaintenanceState {
        &self.state
    }

    fn prefix_digest(&self, upto: Epoch) -> Hash32 {
        // A read error yields a digest no proposal carries, so the device refuses to sign
        // rather than sign something it could not check.
        self.store
            .prefix_digest(self.namespace, upto)
            .unwrap_or(Hash32([0; 32]))
    }

    fn snapshot_blob(&self, upto: Epoch, keep: Option<ContentId>) -> BuiltBlob {
        match self.build_and_keep(upto, keep) {
            Ok(cid) => BuiltBlob {
                cid,
                bytes: None,
                item_blob: None,
            },
            Err(e) => {
                // The CID of no blob: a proposer's proposal fails, a signer refuses.
                tracing::warn!("cannot build the snapshot blob below {upto}: {e}");
                BuiltBlob {
                    cid: SnapshotBlob::cid_of(&[]),
                    bytes: None,
                    item_blob: None,
                }
            }
        }
    }
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
        // scan each. Otherwise each store takes, in one batch per source, only the facts it
        // lacks, and only those are verified: copying every fact into every store checked
        // a signature per fact and device (minutes at a million facts).
        let mut digests = Vec::with_capacity(self.devices.len());
        for d in &self.devices {
            digests.push(d.store().journal_digest(ns)?);
        }
        let agree = digests.windows(2).all(|w| w[0] == w[1]);
        let mut inserted = 0;
        for (to, dest) in self.devices.iter().enumerate() {
            let mut held: HashSet<(Epoch, FactId)> = if agree {
                HashSet::new()
            } else {
                dest.store().items(ns, ..)?.collect::<Result<_, _>>()?
            };
            for (from, source) in self.devices.iter().enumerate() {
                if to == from {
                    continue;
                }
                if !agree {
                    let mut missing = Vec::new();
                    for stored in source.store().scan(ns, ..)? {
                        let stored = stored?;
                        if !held.contains(&(stored.epoch, stored.id)) {
                            missing.push(verify(source, &stored)?);
                        }
                    }
                    held.extend(missing.iter().map(|f| f.order_key()));
                    inserted += dest.store().insert_batch(&missing)?.inserted;
                }
                for (cid, _) in source.store().blobs()? {
                    if !dest.store().has_blob(&cid)? {
                        if let Some(bytes) = source.store().get_blob(&cid)? {
                            dest.store().put_blob(cid.codec(), &bytes)?;
                        }
                    }
                }
            }
        }
        Ok(inserted)
    }

    /// Runs a snapshot ceremony proposed by device `proposer` for `target_epoch` and
    /// returns the completed snapshot; every device has it (and the blob) afterwards.
    pub fn snapshot(
        &mut self,
        proposer: usize,
        target_epoch: Epoch,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<SnapshotCompleted, FleetError> {
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
        while let Some((i, input)) = queue.pop_front() {
            self.now += Duration::from_millis(1);
            let ns = self.devices[i].namespace();
            let outputs = {
                let view = StoreJournal::new(self.devices[i].store(), ns)?;
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
                    ) => refusals.push(format!("{reason:?}")),
                    CeremonyAction::Event(CeremonyEvent::Aborted { reason, .. }) => {
                        refusals.push(format!("aborted: {reason:?}"))
                    }
                    CeremonyAction::Event(_) => {}
                }
            }
        }
        self.sync()?;
        completed.ok_or_else(|| {
            FleetError::Ceremony(if refusals.is_empty() {
                "not enough signature shares".into()
            } else {
                refusals.join("; ")
            })
        })
    }

    /// Gives every engine the key for the current identity epoch: the FROST share from the
    /// device's home, or the device key for a one-device authority.
    fn install_keys(&mut self, rng: &mut (impl RngCore + CryptoRng)) -> Result<(), FleetError> {
        for i in 0..self.devices.len() {
            let d = &self.devices[i];
            let view = StoreJournal::new(d.store(), d.namespace())?;
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
}
