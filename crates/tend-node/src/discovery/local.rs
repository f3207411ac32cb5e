//! Local-network discovery: a device announces its signed address record by UDP multicast
//! on one IPv4 interface and learns its authority's members from their announcements.
//!
//! An announcement is one datagram: [`ANNOUNCE_MAGIC`] followed by the JSON of an
//! [`AddressRecord`], the same signed, expiring record the rendezvous service keeps. The
//! network is not trusted any more than a rendezvous server is: a record is used only if it
//! names a current member, is newer than the one already held, and verifies. The rules live
//! in the sans-IO [`Neighbours`]; [`LocalDiscovery`] only moves datagrams and timers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tend_core::DeviceId;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::record::{AddressRecord, RecordError, RecordLimits};
use super::rendezvous::unix_ms;
use super::{AddressSource, DiscoveryHost, PeerAddr};
use crate::device::Device;
use crate::metrics::Labels;

/// First bytes of every announcement: tells a tend announcement from other traffic on the
/// group, and its version.
pub const ANNOUNCE_MAGIC: &[u8] = b"tend-lan-v1\n";
/// The default multicast group and port (administratively scoped, RFC 2365).
pub const DEFAULT_GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 77), 47177);
/// Largest announcement sent or read: below a typical path MTU, so it is never fragmented.
pub const MAX_ANNOUNCEMENT: usize = 1200;

/// How a node takes part in local-network discovery.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// The IPv4 address of the interface to announce on and listen on (`127.0.0.1` keeps
    /// everything on this host).
    pub interface: Ipv4Addr,
    /// The multicast group and port every device of the network uses.
    pub group: SocketAddrV4,
    /// Time between announcements.
    pub interval: Duration,
    /// Lifetime of the records this node announces (several intervals, so one lost
    /// datagram does not make the device vanish).
    pub lifetime: Duration,
    /// What received records may claim.
    pub limits: RecordLimits,
    /// Most signature checks per second: a flood of fresh forged records costs at most
    /// this much CPU.
    pub max_verifications_per_sec: u32,
}

impl LocalConfig {
    /// Defaults on `interface`: the default group, an announcement every 30 s, records that
    /// live 5 minutes.
    pub fn new(interface: Ipv4Addr) -> Self {
        Self {
            interface,
            group: DEFAULT_GROUP,
            interval: Duration::from_secs(30),
            lifetime: Duration::from_secs(300),
            limits: RecordLimits::default(),
            max_verifications_per_sec: 200,
        }
    }
}

/// Why local discovery could not start, or an announcement was not used.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("local discovery cannot join {group} on interface {interface}: {source}")]
    Socket {
        group: SocketAddrV4,
        interface: Ipv4Addr,
        source: std::io::Error,
    },
    #[error("local discovery needs an IPv4 multicast group, not {0}")]
    NotMulticast(SocketAddrV4),
    #[error("the announcement is {0} bytes (at most {MAX_ANNOUNCEMENT})")]
    TooLarge(usize),
    #[error("not a tend announcement")]
    NotAnnouncement,
    #[error("the announcement does not parse: {0}")]
    Malformed(String),
    #[error("the record is this device's own")]
    Own,
    #[error("device {0} is not a member of this authority")]
    NotMember(DeviceId),
    #[error("a record of {device} issued at {held} or later is already held")]
    Stale { device: DeviceId, held: u64 },
    #[error("too many announcements to verify; dropped")]
    RateLimited,
    #[error("invalid record: {0}")]
    Invalid(#[from] RecordError),
}

impl LocalError {
    /// A short label for the counter of refused announcements.
    pub fn reason(&self) -> &'static str {
        match self {
            LocalError::Socket { .. } | LocalError::NotMulticast(_) => "socket",
            LocalError::TooLarge(_) => "too_large",
            LocalError::NotAnnouncement => "not_announcement",
            LocalError::Malformed(_) => "malformed",
            LocalError::Own => "own",
            LocalError::NotMember(_) => "not_member",
            LocalError::Stale { .. } => "stale",
            LocalError::RateLimited => "rate_limited",
            LocalError::Invalid(_) => "invalid",
        }
    }
}

/// The datagram that announces `record`.
pub fn encode_announcement(record: &AddressRecord) -> Vec<u8> {
    let mut out = ANNOUNCE_MAGIC.to_vec();
    // An AddressRecord always serialises: every field is a plain value.
    out.extend_from_slice(&serde_json::to_vec(record).unwrap_or_default());
    out
}

/// The record a datagram carries, unchecked (see [`Neighbours::offer`]).
pub fn decode_announcement(datagram: &[u8]) -> Result<AddressRecord, LocalError> {
    if datagram.len() > MAX_ANNOUNCEMENT {
        return Err(LocalError::TooLarge(datagram.len()));
    }
    let body = datagram
        .strip_prefix(ANNOUNCE_MAGIC)
        .ok_or(LocalError::NotAnnouncement)?;
    serde_json::from_slice(body).map_err(|e| LocalError::Malformed(e.to_string()))
}

/// What [`Neighbours::offer`] did with a good record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// The first live record of this member.
    New,
    /// A newer record of a member already held.
    Newer,
}

/// The verified, newest record of each member heard on the local network. Sans-IO: the
/// time, this device's id and the current members are arguments.
#[derive(Debug, Default)]
pub struct Neighbours {
    records: BTreeMap<DeviceId, AddressRecord>,
}

impl Neighbours {
    /// Takes in one datagram. The cheap checks come first (size, magic, parse, own,
    /// membership, newer than held), the signature last and only if `may_verify()` says
    /// so, so garbage, strangers and replays cost no signature check.
    pub fn offer(
        &mut self,
        datagram: &[u8],
        me: DeviceId,
        members: &BTreeSet<DeviceId>,
        now: u64,
        limits: &RecordLimits,
        may_verify: impl FnOnce() -> bool,
    ) -> Result<Learned, LocalError> {
        let record = decode_announcement(datagram)?;
        let device = record.device_id;
        if device == me {
            return Err(LocalError::Own);
        }
        if !members.contains(&device) {
            return Err(LocalError::NotMember(device));
        }
        let held = self.records.get(&device).filter(|r| r.expires_at > now);
        if let Some(held) = held {
            if record.issued_at <= held.issued_at {
                return Err(LocalError::Stale {
                    device,
                    held: held.issued_at,
                });
            }
        }
        let learned = if held.is_some() {
            Learned::Newer
        } else {
            Learned::New
        };
        if !may_verify() {
            return Err(LocalError::RateLimited);
        }
        record.verify(now, limits)?;
        self.records.insert(device, record);
        Ok(learned)
    }

    /// Forgets devices that left the membership and records that expired.
    pub fn retain(&mut self, members: &BTreeSet<DeviceId>, now: u64) {
        self.records
            .retain(|d, r| members.contains(d) && r.expires_at > now);
    }

    /// The live members' first addresses.
    pub fn peers(&self, now: u64) -> Vec<PeerAddr> {
        self.records
            .values()
            .filter(|r| r.expires_at > now)
            .filter_map(AddressRecord::peer_addr)
            .collect()
    }
}

/// What the background task shares with the node and with status.
#[derive(Debug, Default)]
struct Shared {
    neighbours: Neighbours,
    announced: u64,
    last_error: Option<String>,
}

/// An [`AddressSource`] fed by local-network announcements. A background task announces
/// this device every interval (and at once when it hears a member for the first time, so
/// a device that starts later is found without waiting a whole interval) and takes in the
/// members' announcements. Dropping it stops the task.
///
/// ```no_run
/// # async fn demo(node: &tend_node::Node) -> Result<(), tend_node::discovery::local::LocalError> {
/// use std::net::Ipv4Addr;
/// use tend_node::discovery::local::{attach, LocalConfig};
/// // Announce on the host's LAN interface; members of the authority are found there.
/// let source = attach(node, LocalConfig::new(Ipv4Addr::new(192, 168, 1, 20)))?;
/// assert_eq!(source.last_error(), None);
/// # Ok(()) }
/// ```
pub struct LocalDiscovery {
    shared: Arc<Mutex<Shared>>,
    task: JoinHandle<()>,
}

impl LocalDiscovery {
    /// Joins the group and starts announcing `listen` for `device`; counts what it does
    /// not use in `refused`, by reason. Holds the device only weakly, so a stopped node's
    /// store can be reopened; must be called inside a tokio runtime.
    pub fn start(
        device: &Arc<Device>,
        listen: SocketAddr,
        config: LocalConfig,
        refused: Family<Labels, Counter>,
    ) -> Result<Self, LocalError> {
        let socket = bind(&config)?;
        // Announce where peers can reach us: a wildcard listen address is reachable at the
        // interface's own address.
        let announced = match listen {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::from((config.interface, a.port()))
            }
            other => other,
        };
        let shared = Arc::new(Mutex::new(Shared::default()));
        let task = tokio::spawn(announce_and_listen(
            Arc::downgrade(device),
            socket,
            announced,
            config,
            shared.clone(),
            refused,
        ));
        Ok(Self { shared, task })
    }

    /// Announcements sent so far.
    pub fn announced(&self) -> u64 {
        lock(&self.shared).announced
    }

    /// The last error sending an announcement, if the last attempt failed.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.shared).last_error.clone()
    }
}

impl Drop for LocalDiscovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AddressSource for LocalDiscovery {
    fn name(&self) -> &str {
        "local"
    }

    fn peers(&self) -> Vec<PeerAddr> {
        lock(&self.shared).neighbours.peers(unix_ms())
    }
}

/// A source shared between the node, which polls it, and whoever wants its counters.
struct SharedSource(Arc<LocalDiscovery>);

impl AddressSource for SharedSource {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn peers(&self) -> Vec<PeerAddr> {
        self.0.peers()
    }
}

/// Adds local-network discovery to a running node and returns the source, for its
/// counters.
pub fn attach(
    node: &impl DiscoveryHost,
    config: LocalConfig,
) -> Result<Arc<LocalDiscovery>, LocalError> {
    let source = Arc::new(LocalDiscovery::start(
        node.device(),
        node.listen_addr(),
        config,
        node.metrics().announcements_refused.clone(),
    )?);
    node.add_source(Box::new(SharedSource(source.clone())));
    Ok(source)
}

/// A UDP socket on the group's port, member of the group on `interface`, sending there
/// with a TTL of 1 (announcements never leave the link) and looping back to this host, so
/// several devices on one machine find each other. The port is shared (SO_REUSEADDR and
/// SO_REUSEPORT): every device of the host receives every announcement.
fn bind(config: &LocalConfig) -> Result<UdpSocket, LocalError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let group = config.group;
    if !group.ip().is_multicast() {
        return Err(LocalError::NotMulticast(group));
    }
    let err = |source| LocalError::Socket {
        group,
        interface: config.interface,
        source,
    };
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    #[cfg(unix)]
    socket.set_reuse_port(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    // Bound to the group address, the socket receives only this group's datagrams.
    socket.bind(&SocketAddr::V4(group).into()).map_err(err)?;
    socket
        .join_multicast_v4(group.ip(), &config.interface)
        .map_err(err)?;
    socket.set_multicast_if_v4(&config.interface).map_err(err)?;
    socket.set_multicast_loop_v4(true).map_err(err)?;
    socket.set_multicast_ttl_v4(1).map_err(err)?;
    UdpSocket::from_std(socket.into()).map_err(err)
}

/// The current members of the device's authority and its id, or `None` once the device is
/// gone (the node stopped).
fn members_of(device: &Weak<Device>) -> Option<(DeviceId, BTreeSet<DeviceId>)> {
    let device = device.upgrade()?;
    let members = device
        .store()
        .maintenance_state(device.namespace())
        .ok()
        .and_then(|s| s.membership().map(|m| m.members.iter().copied().collect()))
        .unwrap_or_default();
    Some((device.device_id(), members))
}

async fn announce_and_listen(
    device: Weak<Device>,
    socket: UdpSocket,
    listen: SocketAddr,
    config: LocalConfig,
    shared: Arc<Mutex<Shared>>,
    refused: Family<Labels, Counter>,
) {
    let Some(key) = device.upgrade().map(|d| d.key().signing_key().clone()) else {
        return;
    };
    let per_sec = NonZeroU32::new(config.max_verifications_per_sec).unwrap_or(NonZeroU32::MIN);
    let verifications: DefaultDirectRateLimiter = RateLimiter::direct(Quota::per_second(per_sec));
    let lifetime = config.lifetime.as_millis() as u64;
    let mut last_issued = 0u64;
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; MAX_ANNOUNCEMENT + 1];
    let Some(mut known) = members_of(&device) else {
        return;
    };
    loop {
        let announce = tokio::select! {
            _ = tick.tick() => {
                // Membership changes are rare; reading it once per interval is enough.
                let Some(now_known) = members_of(&device) else { return };
                known = now_known;
                lock(&shared).neighbours.retain(&known.1, unix_ms());
                true
            }
            received = socket.recv_from(&mut buf) => {
                let Ok((len, _from)) = received else { continue };
                let (me, members) = &known;
                let mut s = lock(&shared);
                let offered = s.neighbours.offer(
                    &buf[..len],
                    *me,
                    members,
                    unix_ms(),
                    &config.limits,
                    || verifications.check().is_ok(),
                );
                match offered {
                    Ok(learned) => learned == Learned::New,
                    Err(LocalError::Own) => false,
                    Err(e) => {
                        tracing::debug!("local discovery: {e}");
                        refused
                            .get_or_create(&vec![("reason".into(), e.reason().into())])
                            .inc();
                        false
                    }
                }
            }
        };
        if !announce {
            continue;
        }
        // Strictly increasing, so receivers never take our update for a replay.
        let issued = unix_ms().max(last_issued + 1);
        last_issued = issued;
        let record = AddressRecord::sign(&key, vec![listen], issued, issued + lifetime);
        let sent = socket
            .send_to(&encode_announcement(&record), SocketAddr::V4(config.group))
            .await;
        let mut s = lock(&shared);
        match sent {
            Ok(_) => {
                s.announced += 1;
                s.last_error = None;
            }
            Err(e) => s.last_error = Some(e.to_string()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn at(port: u16) -> Vec<SocketAddr> {
        vec![SocketAddr::from(([127, 0, 0, 1], port))]
    }

    fn id(key: &SigningKey) -> DeviceId {
        DeviceId(key.verifying_key().to_bytes())
    }

    #[test]
    fn only_newer_verified_records_of_members_are_learned() {
        let me = SigningKey::from_bytes(&[1; 32]);
        let member = SigningKey::from_bytes(&[2; 32]);
        let stranger = SigningKey::from_bytes(&[3; 32]);
        let members: BTreeSet<DeviceId> = [id(&me), id(&member)].into();
        let limits = RecordLimits::default();
        let now = 1_000_000;
        let mut n = Neighbours::default();
        let offer = |n: &mut Neighbours, bytes: &[u8]| {
            n.offer(bytes, id(&me), &members, now, &limits, || true)
        };
        let good = AddressRecord::sign(&member, at(4000), now, now + 10_000);
        assert_eq!(
            offer(&mut n, &encode_announcement(&good)).unwrap(),
            Learned::New
        );
        assert_eq!(
            n.peers(now),
            vec![PeerAddr {
                device: id(&member),
                addr: at(4000)[0]
            }]
        );

        let reason = |r: Result<Learned, LocalError>| r.unwrap_err().reason();
        // A replay, or an older record, never moves the address back.
        let older = AddressRecord::sign(&member, at(4001), now - 1, now + 10_000);
        assert_eq!(reason(offer(&mut n, &encode_announcement(&good))), "stale");
        assert_eq!(reason(offer(&mut n, &encode_announcement(&older))), "stale");
        // A forged newer record of the member.
        let mut forged = AddressRecord::sign(&stranger, at(4002), now + 1, now + 10_000);
        forged.device_id = id(&member);
        assert_eq!(
            reason(offer(&mut n, &encode_announcement(&forged))),
            "invalid"
        );
        // Strangers, our own echo, garbage, oversize, expired.
        let foreign = AddressRecord::sign(&stranger, at(4003), now, now + 10_000);
        assert_eq!(
            reason(offer(&mut n, &encode_announcement(&foreign))),
            "not_member"
        );
        let own = AddressRecord::sign(&me, at(4004), now, now + 10_000);
        assert_eq!(reason(offer(&mut n, &encode_announcement(&own))), "own");
        assert_eq!(reason(offer(&mut n, b"hello")), "not_announcement");
        assert_eq!(reason(offer(&mut n, b"tend-lan-v1\n{")), "malformed");
        let mut big = ANNOUNCE_MAGIC.to_vec();
        big.resize(MAX_ANNOUNCEMENT + 1, b' ');
        assert_eq!(reason(offer(&mut n, &big)), "too_large");
        let expired = AddressRecord::sign(&member, at(4005), now - 20_000, now - 10_000);
        let mut fresh = Neighbours::default();
        assert_eq!(
            reason(offer(&mut fresh, &encode_announcement(&expired))),
            "invalid"
        );
        // Through all that, the first record stands.
        assert_eq!(n.peers(now)[0].addr, at(4000)[0]);

        // Over the verification budget, a record is dropped unverified and not learned.
        let newer = AddressRecord::sign(&member, at(4006), now + 2, now + 10_000);
        let limited = n.offer(
            &encode_announcement(&newer),
            id(&me),
            &members,
            now,
            &limits,
            || false,
        );
        assert_eq!(reason(limited), "rate_limited");
        assert_eq!(
            offer(&mut n, &encode_announcement(&newer)).unwrap(),
            Learned::Newer
        );
        assert_eq!(n.peers(now)[0].addr, at(4006)[0]);

        // A device that leaves the membership is forgotten, as is an expired record.
        n.retain(&[id(&me)].into(), now);
        assert!(n.peers(now).is_empty());
        let mut m = Neighbours::default();
        offer(&mut m, &encode_announcement(&good)).unwrap();
        m.retain(&members, now + 10_000);
        assert!(m.peers(now + 10_000).is_empty());
    }
}
