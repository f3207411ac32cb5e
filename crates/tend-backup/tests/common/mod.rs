//! Shared helpers: device homes with many facts, real snapshots through `LocalFleet`,
//! age keys, restore into a new home, and unpacking/repacking archives to forge bad ones.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tend_backup::format::{member, Manifest, MemberHash};
use tend_backup::{BackupError, Decryption, Encryption, RestoreReport, RestoreTarget};
use tend_core::{Epoch, FactId, Hash32, JournalNamespace, Payload, UnsignedFact, VerifiedFact};
use tend_node::fleet::LocalFleet;
use tend_node::Device;
use tend_store::Store;

/// A restored home, as the CLI makes it: a new device key and an empty store.
pub struct Home(pub Device);

impl RestoreTarget for Home {
    fn store(&self) -> &Store {
        self.0.store()
    }
}

pub fn rng() -> rand::rngs::OsRng {
    rand::rngs::OsRng
}

/// A one-device authority in `dir/name`.
pub fn device(dir: &Path, name: &str) -> Device {
    Device::init(&dir.join(name), &mut rng()).expect("init device")
}

/// Signs `n` application facts with `device`'s key, spread evenly over `epochs`, and
/// stores them in batches of 10 000.
pub fn add_facts(device: &Device, n: u64, epochs: std::ops::RangeInclusive<u64>, tag: &str) {
    let ns = device.namespace();
    let key = device.key().signing_key();
    let span = epochs.end() - epochs.start() + 1;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let epoch = Epoch(epochs.start() + i * span / n.max(1));
        batch.push(
            UnsignedFact {
                namespace: ns,
                epoch,
                payload: Payload::Application {
                    kind: "test".into(),
                    data: format!("{tag}-{i:08}-some-application-data").into_bytes(),
                },
            }
            .sign(key),
        );
        if batch.len() == 10_000 {
            insert(device, &batch);
            batch.clear();
        }
    }
    insert(device, &batch);
}

fn insert(device: &Device, batch: &[VerifiedFact]) {
    let report = device.store().insert_batch(batch).expect("insert");
    assert!(
        report.rejected.is_empty(),
        "rejected: {:?}",
        report.rejected.first()
    );
}

/// Runs a real snapshot ceremony (threshold-signed) among `devices` at `target`.
pub fn snapshot(devices: Vec<Device>, target: u64) -> Vec<Device> {
    let mut fleet = fleet(devices);
    fleet
        .snapshot(0, Epoch(target), &mut rng())
        .expect("snapshot ceremony");
    unfleet(fleet)
}

/// Drives `devices` together (the first is the admin).
pub fn fleet(devices: Vec<Device>) -> LocalFleet {
    LocalFleet::new(devices.into_iter().map(Arc::new).collect())
}

/// The devices back, owned.
pub fn unfleet(fleet: LocalFleet) -> Vec<Device> {
    fleet
        .into_devices()
        .into_iter()
        .map(|d| Arc::try_unwrap(d).ok().expect("no other handle"))
        .collect()
}

/// An age X25519 key pair as encryption and decryption.
pub fn x25519() -> (Encryption, Decryption) {
    let id = tend_backup::age::x25519::Identity::generate();
    (
        Encryption::Recipients(vec![id.to_public()]),
        Decryption::Identities(vec![id]),
    )
}

/// Restores `archive` into `home` as the CLI does.
pub fn restore(
    archive: &Path,
    dec: &Decryption,
    home: &Path,
) -> Result<RestoreReport, BackupError> {
    tend_backup::restore_home(
        archive,
        dec,
        home,
        |dir, ns| {
            Device::init_joining(dir, ns, &mut rng())
                .map(Home)
                .map_err(|e| BackupError::Target(e.to_string()))
        },
        None,
    )
}

/// The digest of the journal index at and above `from`.
pub fn tail_digest(store: &Store, ns: JournalNamespace, from: Epoch) -> Hash32 {
    let mut d = tend_core::journal::DigestBuilder::whole(ns);
    for item in store.items(ns, from..).expect("items") {
        let (e, id) = item.expect("item");
        d.push(e, id);
    }
    d.finish()
}

/// The ids of the maintenance table.
pub fn maintenance_ids(store: &Store, ns: JournalNamespace) -> Vec<(Epoch, FactId)> {
    store
        .scan_maintenance(ns)
        .expect("scan")
        .map(|f| f.map(|f| (f.epoch, f.id)).expect("fact"))
        .collect()
}

/// Decrypts and unpacks an archive into its members, in order.
pub fn unpack(bytes: &[u8], dec: &Decryption) -> Vec<(String, Vec<u8>)> {
    let ids = match dec {
        Decryption::Identities(ids) => ids,
        Decryption::Passphrase(_) => panic!("unpack needs an identity"),
    };
    let d = tend_backup::age::Decryptor::new(bytes).expect("age header");
    let plain = d
        .decrypt(ids.iter().map(|i| i as &dyn tend_backup::age::Identity))
        .expect("decrypt");
    let zstd = zstd::stream::read::Decoder::new(plain).expect("zstd");
    let mut tar = tar::Archive::new(zstd);
    let mut out = Vec::new();
    for e in tar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let name = String::from_utf8(e.path_bytes().into_owned()).expect("name");
        let mut data = Vec::new();
        e.read_to_end(&mut data).expect("read");
        out.push((name, data));
    }
    out
}

/// Rewrites the manifest's member list to the members' real names, sizes and hashes, as
/// a forger who can build an archive would.
pub fn restate_manifest(members: &mut [(String, Vec<u8>)]) {
    let hashes: Vec<MemberHash> = members
        .iter()
        .filter(|(n, _)| n != member::MANIFEST)
        .map(|(n, d)| MemberHash {
            name: n.clone(),
            size: d.len() as u64,
            blake3: blake3::hash(d).to_hex().to_string(),
        })
        .collect();
    for (n, d) in members.iter_mut() {
        if n == member::MANIFEST {
            let mut m: Manifest = serde_json::from_slice(d).expect("manifest");
            m.members = hashes.clone();
            *d = serde_json::to_vec(&m).expect("json");
        }
    }
}

/// Packs members into an archive, rewriting the manifest's member list honestly (as an
/// attacker who can encrypt to the recipient could), unless `keep_manifest`.
pub fn repack(members: &[(String, Vec<u8>)], enc: &Encryption, keep_manifest: bool) -> Vec<u8> {
    let mut members = members.to_vec();
    if !keep_manifest {
        restate_manifest(&mut members);
    }
    let recipients = match enc {
        Encryption::Recipients(r) => r,
        Encryption::Passphrase { .. } => panic!("repack needs recipients"),
    };
    let mut out = Vec::new();
    let age = tend_backup::age::Encryptor::with_recipients(
        recipients
            .iter()
            .map(|r| r as &dyn tend_backup::age::Recipient),
    )
    .expect("encryptor")
    .wrap_output(&mut out)
    .expect("wrap");
    let zstd = zstd::stream::write::Encoder::new(age, 3).expect("zstd");
    let mut tar = tar::Builder::new(zstd);
    for (n, d) in &members {
        let mut h = tar::Header::new_ustar();
        h.set_size(d.len() as u64);
        h.set_mode(0o600);
        tar.append_data(&mut h, n, d.as_slice()).expect("append");
    }
    let zstd = tar.into_inner().expect("tar");
    let age = zstd.finish().expect("zstd finish");
    age.finish().expect("age finish");
    out
}

/// Writes bytes to a fresh file in `dir`.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|mut f| f.write_all(bytes))
        .expect("write");
    p
}
