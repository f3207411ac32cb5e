//! FROST Ed25519 distributed key generation among member devices (no trusted dealer), as a
//! sans-IO participant state machine: messages in, messages and the final key share out.
//!
//! Protocol (RFC 9591 appendix / frost-core `keys::dkg`): every member broadcasts a round-1
//! package (its commitment and proof of knowledge); once it has every other member's
//! round-1 package it sends each member a private round-2 package (a secret share); once it
//! has every other member's round-2 package it derives its [`KeyShare`].
//!
//! Transport requirements, which this module cannot enforce itself: round-2 messages carry
//! secret shares, so they must travel over an authenticated, encrypted channel between the
//! two devices (iroh's QUIC/TLS, keyed by the device ids), and round-1 broadcasts must reach
//! every member identically (a member that got different round-1 packages ends with a
//! different group key, which the membership fact then exposes).

use std::collections::BTreeMap;

use frost_ed25519 as frost;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use tend_core::encoding::{from_canonical, to_canonical};
use tend_core::{DeviceId, Hash32};

use crate::share::KeyShare;

/// Maps a device to its FROST identifier, deterministically: the same device always gets
/// the same identifier, whatever the member set, so shares and messages never need an
/// index table.
pub fn frost_identifier(device: &DeviceId) -> frost::Identifier {
    let mut input = b"tend-frost-identifier-v1".to_vec();
    input.extend_from_slice(device.as_bytes());
    // derive() hashes into the scalar field; it only fails on a zero scalar, which a hash
    // output hits with negligible probability (2^-252).
    frost::Identifier::derive(&input).expect("a hash-derived identifier is never zero")
}

/// What a DKG run is for: every message carries the session id, so messages of another
/// run (another member set, threshold or identity epoch) are never mixed in.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkgSession {
    /// Binds the run to its authority: the authority id, or the genesis nonce when the
    /// authority does not exist yet.
    #[serde(with = "tend_core::encoding::fixed_bytes")]
    pub context: [u8; 32],
    /// The identity epoch the resulting key serves (0 for the genesis key).
    pub identity_epoch: u64,
    /// Sorted, without duplicates.
    pub members: Vec<DeviceId>,
    /// Signers needed for a signature; FROST needs at least 2.
    pub threshold: u16,
}

impl DkgSession {
    /// The session id: BLAKE3 over the canonical encoding.
    pub fn id(&self) -> Hash32 {
        let mut h = blake3::Hasher::new();
        h.update(b"tend-dkg-session-v1");
        h.update(&to_canonical(self));
        h.finalize().into()
    }

    /// Members sorted and unique, 2 <= threshold <= members.
    pub fn validate(&self) -> Result<(), DkgError> {
        if !self.members.windows(2).all(|w| w[0] < w[1]) {
            return Err(DkgError::InvalidSession(
                "members must be sorted and unique".into(),
            ));
        }
        if self.threshold < 2 || usize::from(self.threshold) > self.members.len() {
            return Err(DkgError::InvalidSession(format!(
                "threshold {} of {} members: FROST needs 2 <= threshold <= members \
                 (a one-device authority uses its device key instead)",
                self.threshold,
                self.members.len()
            )));
        }
        Ok(())
    }
}

/// The round a DKG message belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum DkgRound {
    /// Broadcast: commitment and proof of knowledge.
    Round1,
    /// Private, to one member: a secret share.
    Round2,
}

/// A DKG message between members. Its bytes ([`DkgMessage::to_bytes`]) are what goes on
/// the wire.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkgMessage {
    /// [`DkgSession::id`].
    pub session: Hash32,
    pub from: DeviceId,
    /// `None` for a broadcast (round 1).
    pub to: Option<DeviceId>,
    pub round: DkgRound,
    /// The serialized FROST package.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

impl DkgMessage {
    /// Canonical DAG-CBOR.
    pub fn to_bytes(&self) -> Vec<u8> {
        to_canonical(self)
    }

    /// Decodes wire bytes, rejecting non-canonical encodings.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DkgError> {
        from_canonical(bytes).map_err(|e| DkgError::Malformed(e.to_string()))
    }
}

/// What a participant wants done.
#[derive(Debug)]
pub enum DkgAction {
    /// Deliver this message (to `msg.to`, or to every other member when `None`).
    Send(DkgMessage),
    /// The run finished: save the share ([`KeyShare::save`]); the group key goes into
    /// the genesis or membership fact.
    Finished(Box<KeyShare>),
}

/// Why a DKG step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DkgError {
    #[error("invalid DKG session: {0}")]
    InvalidSession(String),
    #[error("device {0:?} is not a member of this DKG session")]
    NotAMember(DeviceId),
    #[error("message belongs to another DKG session")]
    WrongSession,
    #[error("message from {from:?} is addressed to another device")]
    Misaddressed { from: DeviceId },
    #[error("{from:?} sent two different {round:?} packages")]
    Equivocation { from: DeviceId, round: DkgRound },
    #[error("malformed DKG message: {0}")]
    Malformed(String),
    #[error("DKG failed (misbehaving members: {culprits:?}): {reason}")]
    Frost {
        reason: String,
        culprits: Vec<DeviceId>,
    },
    #[error("the DKG run already finished")]
    Finished,
}

enum Phase {
    Round1 {
        secret: frost::keys::dkg::round1::SecretPackage,
    },
    Round2 {
        secret: frost::keys::dkg::round2::SecretPackage,
    },
    Done,
}

/// One member's side of a DKG run.
pub struct DkgParticipant {
    session: DkgSession,
    session_id: Hash32,
    me: DeviceId,
    phase: Phase,
    /// Round-1 packages of the other members, by device.
    round1: BTreeMap<DeviceId, (Vec<u8>, frost::keys::dkg::round1::Package)>,
    /// Round-2 packages for us, by sender; may arrive before our round 1 is complete.
    round2: BTreeMap<DeviceId, (Vec<u8>, frost::keys::dkg::round2::Package)>,
}

impl std::fmt::Debug for DkgParticipant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkgParticipant")
            .field("me", &self.me)
            .field("session", &self.session_id)
            .field("round1", &self.round1.len())
            .field("round2", &self.round2.len())
            .finish()
    }
}

impl DkgParticipant {
    /// Starts `me`'s side of the run; the returned outputs hold its round-1 broadcast.
    pub fn start(
        session: DkgSession,
        me: DeviceId,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(Self, Vec<DkgAction>), DkgError> {
        session.validate()?;
        if !session.members.contains(&me) {
            return Err(DkgError::NotAMember(me));
        }
        let max = u16::try_from(session.members.len())
            .map_err(|_| DkgError::InvalidSession("too many members".into()))?;
        let (secret, package) =
            frost::keys::dkg::part1(frost_identifier(&me), max, session.threshold, rng)
                .map_err(|e| frost_err(e, &session))?;
        let body = package
            .serialize()
            .map_err(|e| DkgError::Malformed(e.to_string()))?;
        let session_id = session.id();
        let msg = DkgMessage {
            session: session_id,
            from: me,
            to: None,
            round: DkgRound::Round1,
            body,
        };
        let p = Self {
            session,
            session_id,
            me,
            phase: Phase::Round1 { secret },
            round1: BTreeMap::new(),
            round2: BTreeMap::new(),
        };
        Ok((p, vec![DkgAction::Send(msg)]))
    }

    /// The session this participant runs.
    pub fn session(&self) -> &DkgSession {
        &self.session
    }

    /// Whether the key share has been produced.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Takes one message from another member. Duplicates are ignored; a member sending two
    /// different packages for one round is an error.
    pub fn handle(&mut self, msg: DkgMessage) -> Result<Vec<DkgAction>, DkgError> {
        if msg.session != self.session_id {
            return Err(DkgError::WrongSession);
        }
        if matches!(self.phase, Phase::Done) {
            return Err(DkgError::Finished);
        }
        if msg.from == self.me || !self.session.members.contains(&msg.from) {
            return Err(DkgError::NotAMember(msg.from));
        }
        match msg.round {
            DkgRound::Round1 => {
                if msg.to.is_some() {
                    return Err(DkgError::Misaddressed { from: msg.from });
                }
                let pkg = frost::keys::dkg::round1::Package::deserialize(&msg.body)
                    .map_err(|e| DkgError::Malformed(e.to_string()))?;
                insert_once(&mut self.round1, msg.from, msg.body, pkg, DkgRound::Round1)?;
            }
            DkgRound::Round2 => {
                if msg.to != Some(self.me) {
                    return Err(DkgError::Misaddressed { from: msg.from });
                }
                let pkg = frost::keys::dkg::round2::Package::deserialize(&msg.body)
                    .map_err(|e| DkgError::Malformed(e.to_string()))?;
                insert_once(&mut self.round2, msg.from, msg.body, pkg, DkgRound::Round2)?;
            }
        }
        self.advance()
    }

    fn others(&self) -> usize {
        self.session.members.len() - 1
    }

    fn round1_map(&self) -> BTreeMap<frost::Identifier, frost::keys::dkg::round1::Package> {
        self.round1
            .iter()
            .map(|(d, (_, p))| (frost_identifier(d), p.clone()))
            .collect()
    }

    fn advance(&mut self) -> Result<Vec<DkgAction>, DkgError> {
        let mut out = Vec::new();
        if matches!(self.phase, Phase::Round1 { .. }) && self.round1.len() == self.others() {
            let Phase::Round1 { secret } = std::mem::replace(&mut self.phase, Phase::Done) else {
                unreachable!("checked above")
            };
            let (secret2, packages) = frost::keys::dkg::part2(secret, &self.round1_map())
                .map_err(|e| frost_err(e, &self.session))?;
            for member in self.session.members.iter().filter(|m| **m != self.me) {
                let pkg = packages.get(&frost_identifier(member)).ok_or_else(|| {
                    DkgError::Malformed("part2 produced no package for a member".into())
                })?;
                let body = pkg
                    .serialize()
                    .map_err(|e| DkgError::Malformed(e.to_string()))?;
                out.push(DkgAction::Send(DkgMessage {
                    session: self.session_id,
                    from: self.me,
                    to: Some(*member),
                    round: DkgRound::Round2,
                    body,
                }));
            }
            self.phase = Phase::Round2 { secret: secret2 };
        }
        if let Phase::Round2 { secret } = &self.phase {
            if self.round2.len() == self.others() {
                let round2: BTreeMap<_, _> = self
                    .round2
                    .iter()
                    .map(|(d, (_, p))| (frost_identifier(d), p.clone()))
                    .collect();
                let (key_package, public) =
                    frost::keys::dkg::part3(secret, &self.round1_map(), &round2)
                        .map_err(|e| frost_err(e, &self.session))?;
                self.phase = Phase::Done;
                let share =
                    KeyShare::from_parts(self.session.clone(), self.me, key_package, public)
                        .map_err(|e| DkgError::Malformed(e.to_string()))?;
                out.push(DkgAction::Finished(Box::new(share)));
            }
        }
        Ok(out)
    }
}

fn insert_once<P>(
    map: &mut BTreeMap<DeviceId, (Vec<u8>, P)>,
    from: DeviceId,
    body: Vec<u8>,
    pkg: P,
    round: DkgRound,
) -> Result<(), DkgError> {
    match map.get(&from) {
        Some((existing, _)) if *existing == body => Ok(()),
        Some(_) => Err(DkgError::Equivocation { from, round }),
        None => {
            map.insert(from, (body, pkg));
            Ok(())
        }
    }
}

fn frost_err(e: frost::Error, session: &DkgSession) -> DkgError {
    let culprits = e.culprits();
    DkgError::Frost {
        reason: e.to_string(),
        culprits: session
            .members
            .iter()
            .filter(|m| culprits.contains(&frost_identifier(m)))
            .copied()
            .collect(),
    }
}

/// Runs a whole DKG among all `session.members` in memory, passing every message through
/// its wire bytes in a deterministic order. For tests, `devnet` and the in-process driver;
/// real devices run one [`DkgParticipant`] each over the network. Shares come back in
/// member order.
pub fn run_in_memory(
    session: &DkgSession,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<Vec<KeyShare>, DkgError> {
    let mut participants = BTreeMap::new();
    let mut queue = std::collections::VecDeque::new();
    for m in &session.members {
        let (p, out) = DkgParticipant::start(session.clone(), *m, rng)?;
        participants.insert(*m, p);
        queue.extend(out);
    }
    let mut shares = BTreeMap::new();
    while let Some(out) = queue.pop_front() {
        match out {
            DkgAction::Finished(share) => {
                shares.insert(share.device_id(), *share);
            }
            DkgAction::Send(msg) => {
                let bytes = msg.to_bytes();
                let targets: Vec<DeviceId> = match msg.to {
                    Some(to) => vec![to],
                    None => session
                        .members
                        .iter()
                        .filter(|m| **m != msg.from)
                        .copied()
                        .collect(),
                };
                for t in targets {
                    let p = participants.get_mut(&t).ok_or(DkgError::NotAMember(t))?;
                    queue.extend(p.handle(DkgMessage::from_bytes(&bytes)?)?);
                }
            }
        }
    }
    session
        .members
        .iter()
        .map(|m| {
            shares
                .remove(m)
                .ok_or_else(|| DkgError::Malformed("a member did not finish".into()))
        })
        .collect()
}
