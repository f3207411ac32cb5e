//! `tend devnet`: a local fleet of real devices on 127.0.0.1 that walks the whole lifecycle
//! in one command and verifies every step.
//!
//! Every device is a real home (key file, redb store) and a real node (iroh endpoint bound
//! to loopback, sync over Negentropy). Key generation runs among the devices in this
//! process (`tend_node::fleet`), with the same state machines a networked one uses; the
//! snapshot ceremony runs over the network between the running nodes.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use serde::Serialize;
use tend_backup::{BackupError, Decryption, Encryption, ExportOptions};
use tend_core::upgrade::ReadinessPolicy;
use tend_core::Epoch;
use tend_core::ProtocolVersion;
use tend_node::fleet::LocalFleet;
use tend_node::upgrade;
use tend_node::{Device, Node, NodeConfig};

use crate::backup::Home;
use crate::output::CmdResult;
use crate::output::Output;

/// `tend devnet` options.
#[derive(ClapArgs, Debug)]
pub struct DevnetArgs {
    /// Number of devices.
    #[arg(long, default_value_t = 3)]
    pub devices: usize,
    /// Signatures needed for a snapshot.
    #[arg(long, default_value_t = 2)]
    pub threshold: u16,
    /// Where the device homes go (default: a temporary directory, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Application facts each device writes.
    #[arg(long, default_value_t = 200)]
    pub facts: usize,
    /// Leave the fleet running after the walk-through (until Ctrl-C).
    #[arg(long)]
    pub keep_running: bool,
}

type DynError = Box<dyn std::error::Error>;

/// One row of the summary table.
#[derive(Serialize)]
struct DeviceRow {
    device_id: String,
    home: PathBuf,
    facts: u64,
    /// Live keys in all collections.
    live_keys: u64,
    /// Untrimmed log entries in all logs.
    log_entries: u64,
    digest: String,
    /// `None` for the restored device, which joined after GC.
    store_bytes_before_gc: Option<u64>,
    store_bytes_after_gc: Option<u64>,
    store_bytes_now: u64,
}

/// Size of the large value the devnet writes (a blob, above the inline limit).
const LARGE_VALUE_BYTES: usize = 40_000;

/// Puts (with overwrites), a key every device writes concurrently, a delete and, on the
/// first device, a large value that is overwritten once (its blob is tombstoned).
fn write_application_data(n: &Node, i: usize) -> Result<(), Box<dyn std::error::Error>> {
    let d = n.device();
    for k in 0..5 {
        let key = format!("device-{i}-key-{k}");
        d.put("devnet", &key, format!("first {i}.{k}").as_bytes())?;
        d.put("devnet", &key, format!("second {i}.{k}").as_bytes())?;
    }
    d.delete("devnet", &format!("device-{i}-key-4"))?;
    d.put(
        "devnet",
        "shared",
        format!("written by device {i}").as_bytes(),
    )?;
    if i == 0 {
        let large: Vec<u8> = (0..LARGE_VALUE_BYTES).map(|b| (b % 251) as u8).collect();
        d.put("devnet", "large", b"an old large value, soon tombstoned")?;
        d.put("devnet", "large-old", &large[..LARGE_VALUE_BYTES - 1])?;
        d.put("devnet", "large-old", b"overwritten")?;
        d.put("devnet", "large", &large)?;
    }
    Ok(())
}

/// The maintenance and the application state digests of a device.
fn state_digests(
    d: &Device,
) -> Result<(tend_core::Hash32, tend_core::Hash32), Box<dyn std::error::Error>> {
    let ns = d.namespace();
    let state = d.store().maintenance_state(ns)?;
    let app = d.store().app_digest(ns, &state.cache_floors)?;
    Ok((state.state_digest(), app))
}

/// Waits until every device reads every live value of the `devnet` collection with the
/// same bytes (large values included: their blobs travel after the facts).
async fn same_values_everywhere(
    nodes: &[Node],
    timeout: Duration,
) -> Result<String, Box<dyn std::error::Error>> {
    use tend_node::data::{run, DataRequest, DataResponse};
    let deadline = Instant::now() + timeout;
    loop {
        let mut reads = Vec::new();
        let mut error = None;
        for n in nodes {
            let req = DataRequest::Scan {
                collection: "devnet".into(),
                prefix: String::new(),
                after: None,
                limit: tend_node::data::MAX_LIMIT,
            };
            match run(n.device(), req) {
                Ok(DataResponse::Scan(rows)) => reads.push(
                    rows.into_iter()
                        .map(|r| (r.key, r.value.0, r.version.id, r.conflicts.len()))
                        .collect::<Vec<_>>(),
                ),
                Ok(_) => error = Some("a scan answered another kind of result".to_string()),
                Err(e) => error = Some(e.to_string()),
            }
        }
        if error.is_none() && reads.iter().all(|r| *r == reads[0]) {
            let conflicts: usize = reads[0].iter().map(|r| r.3).sum();
            let bytes: usize = reads[0].iter().map(|r| r.1.len()).sum();
            return Ok(format!(
                "{} keys ({bytes} bytes, {conflicts} concurrent writes kept as conflicts) on {} devices",
                reads[0].len(),
                nodes.len()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the devices do not read the same values: {}",
                error.unwrap_or_else(|| "their values differ".into())
            )
            .into());
        }
        for n in nodes {
            n.sync_now().await;
        }
    }
}

#[derive(Serialize)]
struct Summary {
    devices: Vec<DeviceRow>,
    threshold: u16,
    namespace: String,
    snapshot_epoch: u64,
    sync_bytes_sent: u64,
    sync_bytes_received: u64,
    steps: Vec<StepRecord>,
    verified: bool,
}

#[derive(Serialize, Clone)]
struct StepRecord {
    step: String,
    detail: String,
    millis: u128,
}

/// Prints progress on stderr (not under `--json`) and records each step.
struct Progress {
    quiet: bool,
    steps: Vec<StepRecord>,
    total: usize,
}

impl Progress {
    /// Records a step whose work was done (asynchronously) since `start`.
    fn record(&mut self, name: &str, detail: String, start: Instant) {
        let millis = start.elapsed().as_millis();
        if !self.quiet {
            eprintln!(
                "[{}/{}] {name} ... ok ({millis} ms) {detail}",
                self.steps.len() + 1,
                self.total
            );
        }
        self.steps.push(StepRecord {
            step: name.into(),
            detail,
            millis,
        });
    }

    fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<(T, String), DynError>,
    ) -> Result<T, DynError> {
        let n = self.steps.len() + 1;
        if !self.quiet {
            eprint!("[{n}/{}] {name} ... ", self.total);
            let _ = std::io::stderr().flush();
        }
        let start = Instant::now();
        let result = f();
        let millis = start.elapsed().as_millis();
        match result {
            Ok((value, detail)) => {
                if !self.quiet {
                    eprintln!("ok ({millis} ms) {detail}");
                }
                self.steps.push(StepRecord {
                    step: name.into(),
                    detail,
                    millis,
                });
                Ok(value)
            }
            Err(e) => {
                if !self.quiet {
                    eprintln!("FAILED");
                }
                Err(format!("devnet step {name:?} failed: {e}").into())
            }
        }
    }
}

/// Runs the devnet.
pub fn run(args: DevnetArgs, json: bool) -> CmdResult {
    if args.devices < 2 || args.threshold < 2 || usize::from(args.threshold) > args.devices {
        return Err(format!(
            "--devices {} --threshold {}: need 2 <= threshold <= devices",
            args.devices, args.threshold
        )
        .into());
    }
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("tend-devnet-").tempdir()?;
            temp.path().to_owned()
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary = rt.block_on(walk(&args, &dir, json))?;
    let human = render(&summary);
    if args.keep_running {
        // The walk-through shut its nodes down for the compaction step; bring them up again.
        rt.block_on(keep_running(&dir, args.devices, json))?;
    }
    Ok(Output::new(summary, human))
}

fn homes(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n).map(|i| dir.join(format!("device-{i}"))).collect()
}

fn node_config(listen: SocketAddr) -> NodeConfig {
    NodeConfig {
        listen,
        sync_interval: Duration::from_millis(500),
        // Loopback answers at once; a stale address must not hold a round for long.
        connect_timeout: Duration::from_secs(1),
        control_socket: true,
        ..NodeConfig::default()
    }
}

/// The install step devnet configures on every device: keep the verified artifact.
const INSTALL_COMMAND: &str = "cp \"$1\" \"$TEND_HOME/installed-artifact\"";

/// Any free loopback port.
const ANY_PORT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Starts a node per device and tells every node about every other.
/// Starts a node per device, on the given addresses where possible (a restarted fleet
/// keeps its ports, so the addresses peers remember stay right).
async fn start_nodes(devices: Vec<Device>, listen: &[SocketAddr]) -> Result<Vec<Node>, DynError> {
    let mut nodes = Vec::new();
    for (i, d) in devices.into_iter().enumerate() {
        let addr = listen.get(i).copied().unwrap_or(ANY_PORT);
        nodes.push(Node::start(d, node_config(addr)).await?);
    }
    let addrs: Vec<_> = nodes.iter().map(Node::peer_addr).collect();
    for n in &nodes {
        for a in &addrs {
            if a.device != n.device_id() {
                n.add_peer(*a)?;
            }
        }
    }
    Ok(nodes)
}

/// Shuts the nodes down at once: each waits up to 2 s for its connections to close, and
/// one after the other that was most of a devnet's wall time.
async fn shutdown_all(nodes: &[Node]) {
    let mut closing = tokio::task::JoinSet::new();
    for n in nodes {
        let n = n.clone();
        closing.spawn(async move { n.shutdown().await });
    }
    while closing.join_next().await.is_some() {}
}

/// Stops the nodes and waits until every store is closed (so it can be reopened).
async fn stop_nodes(nodes: Vec<Node>, homes: &[PathBuf]) -> Result<Vec<Device>, DynError> {
    shutdown_all(&nodes).await;
    drop(nodes);
    let mut devices = Vec::new();
    for home in homes {
        let mut attempt = 0;
        loop {
            match Device::open(home) {
                Ok(d) => break devices.push(d),
                Err(_) if attempt < 100 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(devices)
}

/// Syncs rounds until every device has the same journal digest.
async fn converge(nodes: &[Node], timeout: Duration) -> Result<(String, u32), DynError> {
    let start = Instant::now();
    let mut rounds = 0;
    loop {
        let digests: Vec<String> = nodes
            .iter()
            .map(|n| n.device().digest().map(|d| d.to_string()))
            .collect::<Result<_, _>>()?;
        if digests.iter().all(|d| *d == digests[0]) {
            return Ok((digests[0].clone(), rounds));
        }
        if start.elapsed() > timeout {
            return Err(
                format!("no convergence after {rounds} rounds: digests {digests:?}").into(),
            );
        }
        let mut sessions = 0;
        for n in nodes {
            sessions += n.sync_now().await.sessions.len();
        }
        if sessions == 0 {
            // Peers are still in connect backoff; don't spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        rounds += 1;
    }
}

/// Runs sync rounds until `done` holds on every node (or the timeout passes).
async fn wait_for(
    nodes: &[Node],
    timeout: Duration,
    what: &str,
    done: impl Fn(&Node) -> Result<bool, DynError>,
) -> Result<u32, DynError> {
    let start = Instant::now();
    let mut rounds = 0;
    loop {
        let mut all = true;
        for n in nodes {
            all &= done(n)?;
        }
        if all {
            return Ok(rounds);
        }
        if start.elapsed() > timeout {
            return Err(format!("{what}: not reached after {rounds} rounds").into());
        }
        for n in nodes {
            n.sync_now().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        rounds += 1;
    }
}

async fn walk(args: &DevnetArgs, dir: &Path, json: bool) -> Result<Summary, DynError> {
    let homes = homes(dir, args.devices);
    let mut p = Progress {
        quiet: json,
        steps: Vec::new(),
        total: 18,
    };
    let mut rng = rand::rngs::OsRng;

    let devices = p.step("create devices", || {
        let mut devices = Vec::new();
        for h in &homes {
            let d = Device::init(h, &mut rng)?;
            // The walkthrough collects garbage as a step of its own (stopped devices,
            // states compared before and after), so the devices do not collect by
            // themselves after the snapshot as a running device does by default.
            d.set_gc_policy(tend_node::GcPolicy::Manual)?;
            devices.push(Arc::new(d));
        }
        Ok((
            devices,
            format!("{} homes in {}", homes.len(), dir.display()),
        ))
    })?;

    let mut fleet = LocalFleet::new(devices);
    let created = p.step("authority (DKG)", || {
        let c = fleet.create_authority(args.threshold, &mut rng)?;
        let detail = format!(
            "{}-of-{}, group key {}",
            c.threshold,
            c.members.len(),
            &c.group_key[..16]
        );
        Ok((c, detail))
    })?;
    let devices: Vec<Device> = fleet
        .into_devices()
        .into_iter()
        .map(|d| Arc::try_unwrap(d).map_err(|_| "a device is still shared"))
        .collect::<Result<_, _>>()?;

    let nodes = start_nodes(devices, &[]).await?;
    let listen: Vec<SocketAddr> = nodes.iter().map(Node::listen_addr).collect();
    // Each node announced its release when it started; once every device holds every
    // announcement, writes are in the newest format (3: timed, ZIP-215 signatures), as in
    // a fleet that has been running.
    wait_for(
        &nodes,
        Duration::from_secs(60),
        "release announcements",
        |n| {
            let d = n.device();
            Ok(d.store()
                .maintenance_state(d.namespace())?
                .oldest_member_version()
                .is_some_and(|v| v >= tend_core::ZIP215_FACTS_SINCE))
        },
    )
    .await?;
    p.step("nodes on loopback", || {
        let addrs: Vec<String> = nodes.iter().map(|n| n.listen_addr().to_string()).collect();
        Ok((
            (),
            format!(
                "{}; every release announced, writes in fact format 3",
                addrs.join(" ")
            ),
        ))
    })?;

    p.step("application facts", || {
        for (i, n) in nodes.iter().enumerate() {
            // Batches of 10,000 appends, each one transaction (`DataRequest::Batch`).
            for chunk in (0..args.facts).collect::<Vec<_>>().chunks(10_000) {
                let ops = chunk
                    .iter()
                    .map(|j| tend_node::data::DataRequest::LogAppend {
                        log: "devnet".into(),
                        data: tend_node::data::Bytes64(format!("device {i} fact {j}").into_bytes()),
                    })
                    .collect();
                tend_node::data::run(n.device(), tend_node::data::DataRequest::Batch { ops })?;
            }
            write_application_data(n, i)?;
        }
        Ok((
            (),
            format!(
                "{} log entries on each of {} devices, and puts, overwrites, concurrent puts, \
                 a delete and a {LARGE_VALUE_BYTES}-byte value",
                args.facts,
                nodes.len()
            ),
        ))
    })?;

    let sync_bytes =
        |nodes: &[Node]| -> u64 { nodes.iter().map(|n| n.metrics().bytes_sent.get()).sum() };
    let (start, bytes_before) = (Instant::now(), sync_bytes(&nodes));
    let (digest, rounds) = converge(&nodes, Duration::from_secs(60)).await?;
    p.record(
        "automatic sync",
        format!(
            "one digest {} after {rounds} rounds, {} bytes of sync messages",
            &digest[..16],
            sync_bytes(&nodes) - bytes_before
        ),
        start,
    );

    p.step("cache invalidation", || {
        let writer = nodes[nodes.len() - 1].device();
        let (fact, inv) = tend_node::cache::invalidate(writer, &["user:42".to_string()], None)?;
        Ok((
            inv,
            format!(
                "floor {} for user:42 published by {}",
                fact.epoch(),
                &writer.device_id().to_string()[..8]
            ),
        ))
    })?;

    let version: ProtocolVersion = "1.1.0".parse()?;
    let package = p.step("upgrade published", || {
        for n in &nodes {
            // A real install step: the command receives the verified artifact's path.
            upgrade::set_install_command(n.device(), Some(INSTALL_COMMAND))?;
        }
        let artifact = b"tend devnet upgrade artifact 1.1.0".repeat(32);
        let meta = upgrade::publish(nodes[0].device(), &artifact, version, None, 100)?;
        let detail = format!(
            "{} bytes as a blob, package {}",
            artifact.len(),
            &meta.package_id.to_string()[..16]
        );
        Ok((meta.package_id, detail))
    })?;
    let start = Instant::now();
    let rounds = wait_for(&nodes, Duration::from_secs(60), "upgrade readiness", |n| {
        let installed = n.device().home().join("installed-artifact").exists();
        let ready = upgrade::status(n.device())?
            .packages
            .iter()
            .any(|pk| pk.readiness.satisfied);
        Ok(installed && ready)
    })
    .await?;
    p.record(
        "upgrade fetched, verified, installed, ready",
        format!("every device fetched the artifact over the network, checked its BLAKE3 hash and ran the install command ({rounds} rounds)"),
        start,
    );
    p.step("upgrade activated", || {
        let a = upgrade::activate(nodes[0].device(), &package, ReadinessPolicy::All)?;
        Ok(((), format!("version {} for every device", a.to_version)))
    })?;
    let rounds = wait_for(&nodes, Duration::from_secs(60), "upgrade activation", |n| {
        let d = n.device();
        let state = d.store().maintenance_state(d.namespace())?;
        Ok(upgrade::running_version(d, &state)? == version)
    })
    .await?;
    if !json {
        eprintln!("      every device runs {version} ({rounds} rounds)");
    }

    let old_admin = nodes[0].device_id();
    let new_admin = nodes[1].device_id();
    let handover = p.step("admin replacement", || {
        let d = nodes[0].device();
        let at = Epoch(d.snapshot_status()?.current_epoch + 1);
        tend_node::admin::replace(d, new_admin, at)?;
        Ok((
            at,
            format!(
                "{} hands over to {} at epoch {at}",
                &old_admin.to_string()[..8],
                &new_admin.to_string()[..8]
            ),
        ))
    })?;
    converge(&nodes, Duration::from_secs(60)).await?;

    // Over the network, as `tend snapshot propose` asks a running device: the new admin
    // coordinates, every member answers from its own node, and each device's own node
    // brings the completion into its journal.
    let start = Instant::now();
    let snapshot = nodes[1]
        .propose_snapshot(None, Duration::from_secs(120))
        .await
        .map_err(|e| format!("devnet step \"snapshot ceremony\" failed: {e}"))?;
    let at_proposer = start.elapsed().as_millis();
    let held = |n: &Node| -> Result<bool, DynError> {
        let latest = n.device().snapshot_status()?.latest;
        Ok(latest.is_some_and(|l| l.epoch == snapshot.snapshot.epoch.0))
    };
    while !nodes
        .iter()
        .try_fold(true, |all, n| Ok::<_, DynError>(all && held(n)?))?
    {
        if start.elapsed() > Duration::from_secs(60) {
            return Err("devnet step \"snapshot ceremony\": a device did not verify the completion within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.record(
        "snapshot ceremony",
        format!(
            "epoch {}, {}-of-{} FROST signature over the network: completed at the proposer after {at_proposer} ms, verified on every device",
            snapshot.snapshot.epoch, args.threshold, args.devices
        ),
        start,
    );

    // The snapshot moved every device past the handover epoch: the old admin's next
    // operation must be ignored everywhere, and the cache floor must hold everywhere.
    let probe = tend_core::maintenance::UpgradeMetadata {
        package_id: tend_core::Hash32::of(b"devnet: published by a retired admin"),
        version: "9.9.9".parse()?,
        artifact_hash: tend_core::Hash32::of(b"never fetched"),
        artifact_size: 0,
        fence: None,
        cohort_percent: 100,
    };
    let retired = nodes[0].append(tend_core::Payload::Maintenance(
        tend_core::MaintenanceFact::UpgradePublished(probe.clone()),
    ))?;
    let (_, rounds) = converge(&nodes, Duration::from_secs(60)).await?;
    p.step("admin and cache rules on every device", || {
        for n in &nodes {
            let d = n.device();
            let state = d.store().maintenance_state(d.namespace())?;
            let now = state.current_epoch();
            if now < handover || state.admin_at(now) != Some(new_admin) {
                return Err(format!("device {}: admin is not {} at epoch {now}", d.device_id(), new_admin).into());
            }
            if state.upgrades.contains_key(&probe.package_id) || !state.ignored.contains(&retired.id()) {
                return Err(format!("device {}: the retired admin's operation took effect", d.device_id()).into());
            }
            let floor = tend_node::cache::check(d, "user:42", now)?;
            let stale = tend_node::cache::check(d, "user:42", Epoch(floor.floor.unwrap_or(0)))?;
            if floor.floor.is_none() || stale.valid {
                return Err(format!("device {}: cache floor for user:42 missing", d.device_id()).into());
            }
        }
        Ok(((), format!("new admin in effect from epoch {handover}, the retired admin's later publish ignored, entries at or below the cache floor stale, on every device ({rounds} sync rounds)")))
    })?;

    let bytes_sent = sync_bytes(&nodes);
    let bytes_received: u64 = nodes.iter().map(|n| n.metrics().bytes_received.get()).sum();
    let before: Vec<u64> = nodes
        .iter()
        .map(|n| n.device().store().file_size())
        .collect::<Result<_, _>>()?;
    let states_before: Vec<_> = nodes
        .iter()
        .map(|n| state_digests(n.device()))
        .collect::<Result<_, _>>()?;

    let devices = stop_nodes(nodes, &homes).await?;
    let mut devices = devices;
    let reports = p.step("garbage collection", || {
        let mut reports = Vec::new();
        for d in devices.iter_mut() {
            reports.push(d.gc(false)?);
        }
        for (d, before) in devices.iter().zip(&states_before) {
            let after = state_digests(d)?;
            if after.0 != before.0 {
                return Err(
                    format!("device {}: maintenance state changed by GC", d.device_id()).into(),
                );
            }
            if after.1 != before.1 {
                return Err(
                    format!("device {}: application state changed by GC", d.device_id()).into(),
                );
            }
        }
        let superseded: u64 = reports.iter().map(|r| r.application_facts_pruned).sum();
        let maintenance: u64 = reports
            .iter()
            .map(|r| r.facts_pruned - r.application_facts_pruned)
            .sum();
        let kept: u64 = reports.iter().map(|r| r.live_kept).sum();
        let blobs: u64 = reports.iter().map(|r| r.blobs_pruned).sum();
        if superseded == 0 {
            return Err("GC reclaimed no superseded application fact".into());
        }
        Ok((
            reports,
            format!(
                "{superseded} superseded application facts and {blobs} blobs reclaimed \
                 ({maintenance} maintenance facts left the index), {kept} live application \
                 facts kept; maintenance and application state unchanged"
            ),
        ))
    })?;

    // A backup of one device, restored into a new home: a new device of the authority,
    // which the admin then adds (a re-deal among all four) so it can sync as a member.
    let archive = dir.join("backup.age");
    let restored_home = dir.join("device-restored");
    let identity = tend_backup::age::x25519::Identity::generate();
    let restored = p.step("backup and restore", || {
        let source = &devices[1];
        let encryption = Encryption::recipients(&[identity.to_public().to_string()])?;
        let exported = tend_backup::export_file(
            source.store(),
            source.namespace(),
            &archive,
            &ExportOptions::new(&encryption),
        )?;
        let decryption = Decryption::Identities(vec![identity.clone()]);
        let report = tend_backup::restore_home(
            &archive,
            &decryption,
            &restored_home,
            |tmp, ns| {
                Device::init_joining(tmp, ns, &mut rand::rngs::OsRng)
                    .map(Home)
                    .map_err(|e| BackupError::Target(e.to_string()))
            },
            None,
        )?;
        let restored = Device::open(&restored_home)?;
        let source_state = source.store().maintenance_state(source.namespace())?.state_digest();
        if report.state_digest != source_state.to_string() {
            return Err("the restored state differs from the source's".into());
        }
        if state_digests(&restored)?.1 != state_digests(source)?.1 {
            return Err("the restored application state differs from the source's".into());
        }
        let detail = format!(
            "{} bytes of age-encrypted archive, {} tail facts; restored state digest equals the source's",
            std::fs::metadata(&archive)?.len(),
            exported.tail_facts
        );
        Ok((restored, detail))
    })?;
    let restored_id = restored.device_id();
    // The admin (now device 1) first; the others and the restored device join the re-deal.
    let mut order = devices.into_iter().map(Arc::new).collect::<Vec<_>>();
    order.swap(0, 1);
    order.push(Arc::new(restored));
    let mut fleet = LocalFleet::new(order);
    p.step("restored device admitted", || {
        let c = fleet.create_authority(args.threshold, &mut rng)?;
        Ok((
            (),
            format!(
                "identity epoch {}, {}-of-{} members",
                c.identity_epoch,
                c.threshold,
                c.members.len()
            ),
        ))
    })?;
    let mut devices: Vec<Device> = fleet
        .into_devices()
        .into_iter()
        .map(|d| Arc::try_unwrap(d).map_err(|_| "a device is still shared"))
        .collect::<Result<_, _>>()?;
    devices.swap(0, 1);

    let start = Instant::now();
    let vault = crate::devnet_vault::storage_peer_step(dir)
        .await
        .map_err(|e| format!("devnet step \"storage peer\" failed: {e}"))?;
    p.record(
        "storage peer (encrypted blobs, re-encryption)",
        vault,
        start,
    );

    let nodes = start_nodes(devices, &listen).await?;
    let start = Instant::now();
    // The original devices keep their places; the restored one comes after them, whatever
    // the number of devices.
    let restored_node = nodes
        .iter()
        .find(|n| n.device_id() == restored_id)
        .ok_or("the restored device is missing from the fleet")?;
    nodes[0].add_fact("devnet", b"after gc")?;
    restored_node.add_fact("devnet", b"from the restored device")?;
    let (digest, rounds) = converge(&nodes, Duration::from_secs(60)).await?;
    p.record(
        "restart and converge (with the restored device)",
        format!("one digest {} after {rounds} rounds", &digest[..16]),
        start,
    );

    let mut rows = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let status = n.device().status()?;
        let ns = status
            .namespaces
            .iter()
            .find(|s| s.namespace == created.namespace)
            .ok_or("the authority journal is missing")?;
        let app = n.device().store().app_state(n.device().namespace())?;
        rows.push(DeviceRow {
            device_id: n.device_id().to_string(),
            home: n.device().home().to_owned(),
            facts: ns.facts,
            live_keys: app.live_keys() as u64,
            log_entries: app.log_len() as u64,
            digest: ns.digest.clone(),
            store_bytes_before_gc: before.get(i).copied(),
            store_bytes_after_gc: reports.get(i).map(|r| r.store_bytes_after),
            store_bytes_now: status.store_bytes,
        });
    }
    if rows.iter().any(|r| r.digest != rows[0].digest) {
        return Err("the fleet did not end on one digest".into());
    }
    let start = Instant::now();
    let values = same_values_everywhere(&nodes, Duration::from_secs(60)).await?;
    p.record("every live value reads the same everywhere", values, start);
    if !rows.iter().any(|r| r.device_id == restored_id.to_string()) {
        return Err("the restored device is missing from the fleet".into());
    }
    shutdown_all(&nodes).await;
    Ok(Summary {
        verified: true,
        devices: rows,
        threshold: args.threshold,
        namespace: created.namespace,
        snapshot_epoch: snapshot.snapshot.epoch.0,
        sync_bytes_sent: bytes_sent,
        sync_bytes_received: bytes_received,
        steps: p.steps,
    })
}

async fn keep_running(dir: &Path, n: usize, json: bool) -> Result<(), DynError> {
    let homes = homes(dir, n);
    let devices = stop_nodes(Vec::new(), &homes).await?;
    let nodes = start_nodes(devices, &[]).await?;
    if !json {
        eprintln!("\nfleet running; talk to a device with:");
        for (h, n) in homes.iter().zip(&nodes) {
            eprintln!(
                "  tend --home {}  journal status    # {} at {}",
                h.display(),
                &n.device_id().to_string()[..16],
                n.listen_addr()
            );
        }
        eprintln!("press Ctrl-C to stop");
    }
    tokio::signal::ctrl_c().await?;
    shutdown_all(&nodes).await;
    Ok(())
}

fn render(s: &Summary) -> String {
    let mut out = format!(
        "\ndevnet verified: {} devices, {}-of-{} authority, snapshot at epoch {}\n{}\n\n",
        s.devices.len(),
        s.threshold,
        s.devices.len(),
        s.snapshot_epoch,
        s.namespace
    );
    out.push_str(&format!(
        "{:<18} {:>7} {:>5} {:>7}  {:<18} {:>12} {:>12} {:>12}\n",
        "device", "facts", "keys", "log", "digest", "before GC", "after GC", "now"
    ));
    let bytes = |b: Option<u64>| b.map_or("-".to_string(), |b| b.to_string());
    for r in &s.devices {
        out.push_str(&format!(
            "{:<18} {:>7} {:>5} {:>7}  {:<18} {:>12} {:>12} {:>12}\n",
            &r.device_id[..16],
            r.facts,
            r.live_keys,
            r.log_entries,
            &r.digest[..16],
            bytes(r.store_bytes_before_gc),
            bytes(r.store_bytes_after_gc),
            r.store_bytes_now
        ));
    }
    out.push_str("(store sizes in bytes; the last device was restored from a backup after GC)\n");
    out.push_str(&format!(
        "\nsync bytes: {} sent, {} received\n",
        s.sync_bytes_sent, s.sync_bytes_received
    ));
    out
}
