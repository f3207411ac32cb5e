//! One device's home: creating it, opening it, and the journal operations on it.
//!
//! A home directory holds `device.key` (0600), `store.redb` and, later, key shares and the
//! control socket. `tend init` makes a one-device authority whose group key is the device
//! key, so the device can write facts at once; `tend authority create` replaces it with a
//! threshold authority.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use tend_core::authority::{AuthorityFact, AuthorityGenesis, GroupKey};
use tend_core::{
    DeviceId, Epoch, FactId, Hash32, JournalNamespace, Payload, UnsignedFact, VerifiedFact,
};
use tend_crypto::device::DeviceKey;
use tend_store::{CompactReport, Store, StoreError, StoreOptions};

pub use crate::error::DeviceError;
use crate::snapshot_blob::StoreJournal;
use crate::write::{WriteQueue, WriteTarget};

/// File name of the store inside a home directory.
pub const STORE_FILE: &str = "store.redb";

/// redb's page cache for a device's store. redb's default (1 GiB) keeps every page a
/// device reads or writes until it holds a gigabyte, so a device's memory grew with its
/// journal: catching up on a million facts, the page cache was most of the process's
/// peak (BENCHMARKS.md, "Catching up from one peer"). Pages beyond it are read back
/// through the operating system's page cache.
pub const STORE_CACHE_BYTES: usize = 64 << 20;

/// The store options a device opens its store with (its page cache, above).
pub fn store_options() -> StoreOptions {
    StoreOptions {
        cache_size: Some(STORE_CACHE_BYTES),
        ..StoreOptions::default()
    }
}
/// Setting that names the journal this device writes to.
const CURRENT_NAMESPACE: &str = "current_namespace";
/// Setting that holds the device's [`GcPolicy`].
const GC_POLICY: &str = "gc_policy";

/// An open device home.
pub struct Device {
    home: PathBuf,
    key: DeviceKey,
    store: Store,
    /// The journal this device writes to; changes only when it joins an authority.
    namespace: RwLock<JournalNamespace>,
    /// Data writes waiting for the next group commit.
    writes: Arc<WriteQueue>,
}

/// Per-namespace status, as `tend journal status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NamespaceStatus {
    pub namespace: String,
    /// Facts in the journal index (pruned facts are not counted):
    /// `application_facts + maintenance_facts`.
    pub facts: u64,
    /// Application facts in the journal index.
    pub application_facts: u64,
    /// Maintenance and authority facts in the journal index.
    pub maintenance_facts: u64,
    /// Maintenance and authority facts the reduced maintenance state is folded from: those
    /// in the journal index and those pruned from it, which the store keeps for reduction
    /// (`maintenance_facts + state_facts_pruned`).
    pub state_facts: u64,
    /// Maintenance and authority facts pruned from the journal index and kept only for
    /// reduction.
    pub state_facts_pruned: u64,
    pub min_epoch: Option<u64>,
    pub max_epoch: Option<u64>,
    pub current_epoch: u64,
    pub identity_epoch: u64,
    pub snapshot_epoch: u64,
    pub digest: String,
}

/// The device's journals and store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JournalStatus {
    pub device_id: String,
    pub current_namespace: String,
    pub store_bytes: u64,
    pub namespaces: Vec<NamespaceStatus>,
}

/// The authority this device writes to, as `tend authority status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthorityStatus {
    pub namespace: String,
    pub identity_epoch: u64,
    pub threshold: u16,
    pub members: Vec<String>,
    pub group_key: String,
    pub admin: Option<String>,
    pub current_epoch: u64,
}

/// Snapshots and GC, as `tend snapshot status` shows them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotStatus {
    pub namespace: String,
    pub current_epoch: u64,
    /// The latest verified snapshot: facts below its epoch may be pruned.
    pub latest: Option<SnapshotSummary>,
    pub open_proposals: Vec<ProposalSummary>,
    pub gc_policy: GcPolicy,
}

/// A verified snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub epoch: u64,
    pub digest: String,
    pub blob_cid: String,
    pub blob_stored: bool,
}

/// A proposal that has not completed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProposalSummary {
    pub proposal_id: String,
    pub target_epoch: u64,
    pub proposer: String,
}

/// Whether and when this device prunes what a verified snapshot covers.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GcPolicy {
    /// The running device collects garbage by itself after each verified snapshot it
    /// adopts or completes (`tend gc` prunes too).
    #[default]
    Prune,
    /// Prunes only when the operator runs `tend gc`.
    Manual,
    /// Never prunes: the device keeps the whole journal (an archive).
    Archive,
}

/// What `tend gc` did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcReport {
    pub dry_run: bool,
    pub floor: u64,
    pub facts_pruned: u64,
    pub fact_bytes: u64,
    /// Application facts below the floor kept because the state still needs them.
    #[serde(default)]
    pub live_kept: u64,
    /// Of `facts_pruned`, application facts the state no longer needed (superseded,
    /// deleted, trimmed or invalidated); the rest are maintenance facts, which leave the
    /// index but stay in the maintenance table.
    #[serde(default)]
    pub application_facts_pruned: u64,
    pub blobs_pruned: u64,
    pub store_bytes_before: u64,
    pub store_bytes_after: u64,
    /// Whether the file was compacted: not on a dry run, nor on a running device whose
    /// store stayed busy (the next `tend gc` compacts it), nor by automatic GC when it
    /// was not worth it (`compaction_skipped`).
    pub compacted: bool,
    /// Automatic GC only: pruning freed too little of the file to be worth rewriting it
    /// ([`Device::gc_automatic`]).
    #[serde(default)]
    pub compaction_skipped: bool,
    /// Whether the latest snapshot blob is kept as references to the facts below it that
    /// GC kept, instead of a second copy of them (docs/ARCHITECTURE.md section 4a).
    #[serde(default)]
    pub snapshot_blob_as_facts: bool,
}

/// One fact, as `tend journal list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FactSummary {
    pub epoch: u64,
    pub id: String,
    pub author: String,
    pub kind: String,
    /// Application data as text when it is UTF-8, else hex.
    pub data: Option<String>,
}

impl Device {
    /// Creates a device in `home`: a new key (0600), an empty store, and a one-device
    /// authority. Refuses a home that already holds a key or a store.
    pub fn init(home: &Path, rng: &mut (impl RngCore + CryptoRng)) -> Result<Device, DeviceError> {
        let store_path = home.join(STORE_FILE);
        if store_path.exists() || DeviceKey::path(home).exists() {
            return Err(DeviceError::AlreadyInitialised(home.to_owned()));
        }
        create_home(home)?;
        let key = DeviceKey::generate(rng);
        key.save(home)?;
        let store = Store::create_with(&store_path, &store_options())?;
        let me = key.device_id();
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let genesis = AuthorityGenesis {
            nonce,
            members: vec![me],
            threshold: 1,
            group_key: GroupKey(me.0),
            admin: me,
        };
        let namespace = JournalNamespace::Authority(genesis.authority_id());
        let fact = UnsignedFact {
            namespace,
            epoch: Epoch::ZERO,
            payload: Payload::Authority(AuthorityFact::Genesis(genesis)),
        }
        .sign(key.signing_key());
        let report = store.insert_batch(&[fact])?;
        if let Some(r) = report.rejected.first() {
            return Err(DeviceError::Rejected(r.error.to_string()));
        }
        store.put_setting(CURRENT_NAMESPACE, &hex_ns(&namespace))?;
        Ok(Device {
            home: home.to_owned(),
            key,
            store,
            namespace: RwLock::new(namespace),
            writes: Default::default(),
        })
    }

    /// Creates a device in `home` that joins an existing authority journal: a new key
    /// (0600) and an empty store whose current journal is `namespace`, without a genesis of
    /// its own. The device learns the journal (genesis, membership) by synchronising with a
    /// member, after the admin has added its id to the membership.
    pub fn init_joining(
        home: &Path,
        namespace: JournalNamespace,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Device, DeviceError> {
        let store_path = home.join(STORE_FILE);
        if store_path.exists() || DeviceKey::path(home).exists() {
            return Err(DeviceError::AlreadyInitialised(home.to_owned()));
        }
        create_home(home)?;
        let key = DeviceKey::generate(rng);
        key.save(home)?;
        let store = Store::create_with(&store_path, &store_options())?;
        store.put_setting(CURRENT_NAMESPACE, &hex_ns(&namespace))?;
        Ok(Device {
            home: home.to_owned(),
            key,
            store,
            namespace: RwLock::new(namespace),
            writes: Default::default(),
        })
    }

    /// Opens an existing home.
    pub fn open(home: &Path) -> Result<Device, DeviceError> {
        let store_path = home.join(STORE_FILE);
        if !store_path.exists() {
            return Err(DeviceError::NotInitialised(home.to_owned()));
        }
        let store = Store::open_with(&store_path, &store_options())?;
        let key = DeviceKey::load(home)?;
        let namespace = store
            .get_setting::<String>(CURRENT_NAMESPACE)?
            .and_then(|s| parse_ns(&s))
            .ok_or(DeviceError::NoCurrentJournal)?;
        Ok(Device {
            home: home.to_owned(),
            key,
            store,
            namespace: RwLock::new(namespace),
            writes: Default::default(),
        })
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn device_id(&self) -> DeviceId {
        self.key.device_id()
    }

    pub fn key(&self) -> &DeviceKey {
        &self.key
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The queue of data writes whose group commit stores concurrent writers' facts
    /// together (see [`crate::write::WriteQueue`]).
    pub fn write_queue(&self) -> &Arc<WriteQueue> {
        &self.writes
    }

    /// The journal this device writes to.
    pub fn namespace(&self) -> JournalNamespace {
        *self.namespace.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes this device write to `namespace` from now on (it joined that authority).
    pub fn adopt_namespace(&self, namespace: JournalNamespace) -> Result<(), DeviceError> {
        self.store
            .put_setting(CURRENT_NAMESPACE, &hex_ns(&namespace))?;
        *self.namespace.write().unwrap_or_else(|e| e.into_inner()) = namespace;
        Ok(())
    }

    /// Signs `payload` at the journal's current epoch and stores it, in the timed format
    /// once every member reads it.
    pub fn append(&self, payload: Payload) -> Result<VerifiedFact, DeviceError> {
        let state = self.store.maintenance_state(self.namespace())?;
        let fact = UnsignedFact {
            namespace: self.namespace(),
            epoch: state.current_epoch(),
            payload,
        };
        let format = state.write_format(crate::write::now_ms);
        self.store_signed(fact.sign_with(self.key.signing_key(), format))
    }

    /// Signs a fact exactly as given (its namespace and epoch chosen by the caller, e.g. the
    /// snapshot ceremony) and stores it.
    pub fn write(&self, fact: UnsignedFact) -> Result<VerifiedFact, DeviceError> {
        self.store_signed(fact.sign(self.key.signing_key()))
    }

    fn store_signed(&self, fact: VerifiedFact) -> Result<VerifiedFact, DeviceError> {
        let report = self.store.insert_batch(std::slice::from_ref(&fact))?;
        match report.rejected.first() {
            Some(r) => Err(DeviceError::Rejected(r.error.to_string())),
            None => Ok(fact),
        }
    }

    /// Appends an application fact.
    pub fn add_application_fact(
        &self,
        kind: &str,
        data: &[u8],
    ) -> Result<VerifiedFact, DeviceError> {
        if kind.is_empty() || kind.len() > 256 || kind.chars().any(char::is_control) {
            return Err(DeviceError::InvalidInput(
                "--kind must be 1 to 256 printable characters".into(),
            ));
        }
        let max = tend_core::MAX_FACT_BYTES - 1024;
        if data.len() > max {
            return Err(DeviceError::InvalidInput(format!(
                "--data is {} bytes; a fact holds at most {max}",
                data.len()
            )));
        }
        // An ordered append (a Lamport clock of the log), so the log reads in the order
        // entries were written; `Payload::Application` is what earlier releases wrote.
        let seq = self.store.app_state(self.namespace())?.next_seq(kind);
        self.append(Payload::Data(tend_core::DataOp::Append(
            tend_core::app::Append {
                log: kind.into(),
                seq,
                data: serde_bytes::ByteBuf::from(data.to_vec()),
            },
        )))
    }

    /// Counts, epochs, digest per namespace, and the store's size.
    pub fn status(&self) -> Result<JournalStatus, DeviceError> {
        let mut namespaces = Vec::new();
        for ns in self.store.namespaces()? {
            let Some(stats) = self.store.stats(ns)? else {
                continue;
            };
            let state = self.store.maintenance_state(ns)?;
            let (state_facts, indexed_maintenance) = self.indexed_maintenance(ns, &stats)?;
            // Both counts are of one moment only on a stopped device; a running one may
            // admit facts in between, so the parts are bounded by the whole.
            let facts = stats.facts.max(indexed_maintenance);
            namespaces.push(NamespaceStatus {
                namespace: ns.to_string(),
                facts,
                application_facts: facts - indexed_maintenance,
                maintenance_facts: indexed_maintenance,
                state_facts,
                state_facts_pruned: state_facts.saturating_sub(indexed_maintenance),
                min_epoch: stats.min_epoch.map(|e| e.0),
                max_epoch: stats.max_epoch.map(|e| e.0),
                current_epoch: state.current_epoch().0,
                identity_epoch: state.identity_epoch(),
                snapshot_epoch: state.snapshot_epoch().0,
                digest: self.store.journal_digest(ns)?.to_string(),
            });
        }
        Ok(JournalStatus {
            device_id: self.device_id().to_string(),
            current_namespace: self.namespace().to_string(),
            store_bytes: self.store.file_size()?,
            namespaces,
        })
    }

    /// The maintenance and authority facts of `ns` the reduced state is folded from, and how
    /// many of them are still in the journal index. Pruning removed those below the floor
    /// of the last GC, which need not be the current snapshot's epoch (a snapshot completed
    /// since, or no GC yet), so each one is looked up in the index: one key-only scan per
    /// epoch that has maintenance facts.
    fn indexed_maintenance(
        &self,
        ns: JournalNamespace,
        stats: &tend_store::NamespaceStats,
    ) -> Result<(u64, u64), DeviceError> {
        let mut by_epoch: BTreeMap<Epoch, HashSet<FactId>> = BTreeMap::new();
        let mut all = 0;
        for f in self.store.scan_maintenance(ns)? {
            let f = f?;
            all += 1;
            by_epoch.entry(f.epoch).or_default().insert(f.id);
        }
        let (Some(lo), Some(hi)) = (stats.min_epoch, stats.max_epoch) else {
            return Ok((all, 0));
        };
        let mut indexed = 0;
        for (epoch, ids) in by_epoch.range(lo..=hi) {
            for item in self.store.items(ns, *epoch..=*epoch)? {
                if ids.contains(&item?.1) {
                    indexed += 1;
                }
            }
        }
        Ok((all, indexed))
    }

    /// The journal digest of the current namespace.
    pub fn digest(&self) -> Result<Hash32, DeviceError> {
        Ok(self.store.journal_digest(self.namespace())?)
    }

    /// The authority of the current journal.
    pub fn authority_status(&self) -> Result<AuthorityStatus, DeviceError> {
        let state = self.store.maintenance_state(self.namespace())?;
        let m = state.membership().ok_or(DeviceError::NoCurrentJournal)?;
        Ok(AuthorityStatus {
            namespace: self.namespace().to_string(),
            identity_epoch: m.identity_epoch,
            threshold: m.threshold,
            members: m.members.iter().map(ToString::to_string).collect(),
            group_key: hex::encode(m.group_key.0),
            admin: state.admin_at(state.current_epoch()).map(|a| a.to_string()),
            current_epoch: state.current_epoch().0,
        })
    }

    /// The latest snapshot, open proposals and GC policy of the current journal.
    pub fn snapshot_status(&self) -> Result<SnapshotStatus, DeviceError> {
        let state = self.store.maintenance_state(self.namespace())?;
        let latest = match &state.latest_snapshot {
            Some(s) => Some(SnapshotSummary {
                epoch: s.snapshot.epoch.0,
                digest: s.snapshot.digest.to_string(),
                blob_cid: s.snapshot.blob_cid.to_string(),
                blob_stored: self.store.has_blob(&s.snapshot.blob_cid)?,
            }),
            None => None,
        };
        Ok(SnapshotStatus {
            namespace: self.namespace().to_string(),
            current_epoch: state.current_epoch().0,
            latest,
            open_proposals: state
                .proposals
                .iter()
                .map(|(id, p)| ProposalSummary {
                    proposal_id: id.to_string(),
                    target_epoch: p.proposal.target_epoch.0,
                    proposer: p.proposer.to_string(),
                })
                .collect(),
            gc_policy: self.gc_policy()?,
        })
    }

    /// The device's GC policy.
    pub fn gc_policy(&self) -> Result<GcPolicy, DeviceError> {
        Ok(self.store.get_setting(GC_POLICY)?.unwrap_or_default())
    }

    /// Sets the device's GC policy.
    pub fn set_gc_policy(&self, policy: GcPolicy) -> Result<(), DeviceError> {
        Ok(self.store.put_setting(GC_POLICY, &policy)?)
    }

    /// Prunes what the latest verified snapshot covers (DESIGN rule 4) and compacts the
    /// file; with `dry_run`, only reports what would go. On a running device compaction
    /// waits for a moment when no sync session holds the store (see [`compact_when_idle`]).
    pub fn gc(&self, dry_run: bool) -> Result<GcReport, DeviceError> {
        self.collect(dry_run, false)
    }

    /// [`Device::gc`] as a running device runs it by itself after each snapshot: it
    /// compacts only when pruning freed at least an eighth of the file (or turned a fetched
    /// snapshot blob into references). Compacting rewrites the whole file, and no
    /// transaction of the store can begin meanwhile (seconds at a million facts), so
    /// doing it after every snapshot would stall the device's sessions and API for the
    /// sake of a few freed pages, which later writes reuse anyway.
    pub fn gc_automatic(&self) -> Result<GcReport, DeviceError> {
        self.collect(false, true)
    }

    fn collect(&self, dry_run: bool, only_if_worth_it: bool) -> Result<GcReport, DeviceError> {
        if !dry_run && self.gc_policy()? == GcPolicy::Archive {
            return Err(DeviceError::ArchiveDevice);
        }
        let before = self.store.file_size()?;
        let mut skipped = false;
        let (report, compacted, as_facts) = if dry_run {
            let report = self.store.prune_dry_run(self.namespace())?;
            (report, None, false)
        } else {
            let report = self.store.prune(self.namespace())?;
            let journal = StoreJournal::new(&self.store, self.namespace());
            let latest_as_facts_before = journal.latest_blob_kept_as_facts()?;
            let as_facts = journal.keep_latest_blob_as_facts()?;
            let freed = report.fact_bytes + report.blob_bytes;
            skipped =
                only_if_worth_it && freed < before / 8 && (latest_as_facts_before || !as_facts);
            let compacted = if skipped {
                None
            } else {
                compact_when_idle(&self.store)?
            };
            (report, compacted, as_facts)
        };
        Ok(GcReport {
            dry_run,
            floor: report.floor.0,
            facts_pruned: report.facts,
            live_kept: report.live_kept,
            application_facts_pruned: report.facts - report.maintenance,
            fact_bytes: report.fact_bytes,
            blobs_pruned: report.blobs,
            store_bytes_before: before,
            store_bytes_after: compacted.as_ref().map_or(before, |c| c.bytes_after),
            compacted: compacted.is_some(),
            compaction_skipped: skipped,
            snapshot_blob_as_facts: as_facts,
        })
    }

    /// Up to `limit` facts of the current journal from `from` on, in `(epoch, id)` order.
    pub fn list(&self, from: Epoch, limit: usize) -> Result<Vec<FactSummary>, DeviceError> {
        let mut out = Vec::new();
        for stored in self.store.scan(self.namespace(), from..)?.take(limit) {
            let stored = stored?;
            let fact = stored.verify().map_err(|source| StoreError::FactCorrupt {
                path: self.store.path().to_owned(),
                source,
            })?;
            out.push(summarise(&fact));
        }
        Ok(out)
    }
}

impl WriteTarget for Device {
    fn store(&self) -> &Store {
        Device::store(self)
    }

    fn key(&self) -> &DeviceKey {
        Device::key(self)
    }

    fn namespace(&self) -> JournalNamespace {
        Device::namespace(self)
    }
}

/// Compacts the store once no transaction of it is alive, trying for up to two seconds
/// (a running device's sync sessions hold a read snapshot only while they reconcile);
/// `None` if it stayed busy. Sessions wait while the compaction runs, under a second for a
/// 200 MB store.
fn compact_when_idle(store: &Store) -> Result<Option<CompactReport>, StoreError> {
    for _ in 0..40 {
        match store.compact() {
            Ok(report) => return Ok(Some(report)),
            Err(StoreError::Busy { .. }) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

fn summarise(f: &VerifiedFact) -> FactSummary {
    let data = match f.payload() {
        Payload::Application { data, .. } => Some(&data[..]),
        Payload::Data(tend_core::DataOp::Append(a)) => Some(&a.data[..]),
        _ => None,
    }
    .map(|data| match std::str::from_utf8(data) {
        Ok(s) => s.to_string(),
        Err(_) => hex::encode(data),
    });
    FactSummary {
        epoch: f.epoch().0,
        id: f.id().to_string(),
        author: f.author().to_string(),
        kind: f.payload().kind_name(),
        data,
    }
}

/// Creates the home directory, owner-only (0700): it holds the key and the control socket.
fn create_home(home: &Path) -> Result<(), DeviceError> {
    let err = |source| DeviceError::CreateHome {
        path: home.to_owned(),
        source,
    };
    std::fs::create_dir_all(home).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

fn hex_ns(ns: &JournalNamespace) -> String {
    hex::encode(ns.to_bytes())
}

fn parse_ns(s: &str) -> Option<JournalNamespace> {
    JournalNamespace::from_bytes(&hex::decode(s).ok()?)
}
