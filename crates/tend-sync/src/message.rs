//! Sync session messages and their canonical, versioned DAG-CBOR encoding.
//!
//! Wire form: `[SYNC_WIRE_VERSION, tag, body]`, where `body` is a byte string holding the
//! canonical DAG-CBOR of the variant's fields (tuples only, so there is one encoding per
//! value). Decoding checks the size limit first, then the version, then canonicality of
//! both layers, and reports a typed [`MessageError`]; it never panics on input.

use serde_bytes::ByteBuf;
use tend_core::encoding::{from_canonical, to_canonical};
use tend_core::{
    DecodeError, DeviceId, Epoch, FactId, JournalNamespace, MaintenanceEpoch, ProtocolVersion,
};

/// The version of this message format.
pub const SYNC_WIRE_VERSION: u64 = 1;

/// The default upper bound of one encoded message.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Whether the sender satisfies every activated upgrade fence (DESIGN rule 7).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FenceStatus {
    /// No fence, or every fence is satisfied.
    Satisfied,
    /// The strongest fence is not satisfied at the sender's local epoch and version.
    NotSatisfied {
        fence: Epoch,
        required: ProtocolVersion,
        local_epoch: Epoch,
    },
}

impl FenceStatus {
    /// Computes the status from a reduced state, as a device at `local_epoch` running
    /// `version` sees it.
    pub fn from_state(
        state: &tend_core::MaintenanceState,
        local_epoch: Epoch,
        version: ProtocolVersion,
    ) -> Self {
        match state.active_fence() {
            Some((fence, required)) if !state.fence_satisfied(local_epoch, version) => {
                FenceStatus::NotSatisfied {
                    fence,
                    required,
                    local_epoch,
                }
            }
            _ => FenceStatus::Satisfied,
        }
    }
}

/// Why a session was refused at the handshake. Every variant renders as a line a user can
/// read on the refused side.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum RefuseReason {
    /// The initiator is not a member of the authority.
    #[error("refused: not a member of this authority")]
    NotAuthorized,
    /// The responder does not keep this namespace.
    #[error("refused: journal {0} is not kept here")]
    UnknownNamespace(JournalNamespace),
    /// Protocol major versions differ.
    #[error("refused: protocol {theirs} is incompatible with {ours}")]
    IncompatibleProtocol {
        theirs: ProtocolVersion,
        ours: ProtocolVersion,
    },
    /// The refusing device itself does not satisfy an activated fence.
    #[error("refused: this device is at epoch {local_epoch} and has not reached the activation fence at epoch {fence} (version {required} required)")]
    FenceNotSatisfied {
        fence: Epoch,
        required: ProtocolVersion,
        local_epoch: Epoch,
    },
    /// The initiator reported that it does not satisfy an activated fence.
    #[error("refused: the peer is at epoch {local_epoch} and has not reached the activation fence at epoch {fence} (version {required} required)")]
    PeerFenceNotSatisfied {
        fence: Epoch,
        required: ProtocolVersion,
        local_epoch: Epoch,
    },
    /// The responder has no session slot free.
    #[error("refused: busy, too many sessions")]
    Busy,
    /// The initiator opened sessions faster than the responder's limit allows; it may try
    /// again after this many milliseconds.
    #[error("refused: too many sessions from this device, try again in {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
}

/// Why a running session was aborted by one side.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum AbortReason {
    /// The sender's identity epoch advanced; retry under the new epoch (DESIGN rule 9).
    #[error("identity epoch advanced from {from} to {to}")]
    EpochAdvanced { from: u64, to: u64 },
    /// The sender gave up on the session (misbehaviour, timeout, shutdown).
    #[error("session closed by the peer")]
    Closed,
    /// The sender learnt mid-session of an activated fence that it does not satisfy
    /// itself: it runs a version older than `required` at `local_epoch` >= `fence`
    /// (DESIGN rule 7, checked after every batch, not only at the handshake).
    #[error("the sending device is at epoch {local_epoch}, past the activation fence at epoch {fence}, and does not run version {required}")]
    FenceNotSatisfied {
        fence: Epoch,
        required: ProtocolVersion,
        local_epoch: Epoch,
    },
    /// The sender (a responder) is at `local_epoch`, past an activated fence that
    /// requires `required`, and the receiver announced an older version at the handshake.
    #[error("this device's version is older than {required}, mandatory from epoch {fence} (the peer is at epoch {local_epoch})")]
    PeerFenceNotSatisfied {
        fence: Epoch,
        required: ProtocolVersion,
        local_epoch: Epoch,
    },
}

/// The initiator's opening message.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Hello {
    pub protocol: ProtocolVersion,
    pub namespace: JournalNamespace,
    pub device: DeviceId,
    pub epoch: MaintenanceEpoch,
    pub fence: FenceStatus,
    /// The first negentropy message, so reconciliation starts in the first round trip.
    pub reconcile: Vec<u8>,
}

/// The responder's acceptance.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Accept {
    pub protocol: ProtocolVersion,
    pub device: DeviceId,
    pub epoch: MaintenanceEpoch,
    pub fence: FenceStatus,
    /// The answer to the first negentropy message.
    pub reconcile: Vec<u8>,
}

/// A message of a sync session.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum SyncMessage {
    Hello(Hello),
    Accept(Accept),
    Refuse(RefuseReason),
    /// A negentropy message (initiator query or responder answer).
    Reconcile(Vec<u8>),
    /// Initiator to responder: send these facts.
    Want(Vec<FactId>),
    /// Initiator to responder: send the facts at the set bits (LSB first) of the ids listed
    /// in the `IdList` ranges of your answer number `answer` (0 = the one in `Accept`).
    /// About one bit per id instead of 32 bytes.
    WantIndexed {
        answer: u64,
        bits: Vec<u8>,
    },
    /// Canonical fact encodings.
    Facts(Vec<Vec<u8>>),
    /// The sender has nothing more to send.
    Done,
    Abort(AbortReason),
}

/// Why bytes are not a valid sync message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("message is {len} bytes, larger than the limit of {max}")]
    Oversized { len: usize, max: usize },
    #[error("message format version {0} is not supported (this release speaks version 1)")]
    UnsupportedVersion(u64),
    #[error("unknown message tag {0}")]
    UnknownTag(u64),
    #[error("invalid message: {0}")]
    Invalid(#[from] DecodeError),
    #[error("invalid field: {0}")]
    Field(&'static str),
}

mod tag {
    pub const HELLO: u64 = 0;
    pub const ACCEPT: u64 = 1;
    pub const REFUSE: u64 = 2;
    pub const RECONCILE: u64 = 3;
    pub const WANT: u64 = 4;
    pub const FACTS: u64 = 5;
    pub const DONE: u64 = 6;
    pub const ABORT: u64 = 7;
    pub const WANT_INDEXED: u64 = 8;
}

type WireVersion = (u16, u16, u16);
type WireEpoch = (u64, u64);
/// `(kind, fence, required, local_epoch)`: kind 0 satisfied, 1 not satisfied.
type WireFence = (u8, u64, WireVersion, u64);
type WireHello = (
    WireVersion,
    JournalNamespace,
    DeviceId,
    WireEpoch,
    WireFence,
    ByteBuf,
);
type WireAccept = (WireVersion, DeviceId, WireEpoch, WireFence, ByteBuf);
/// `(code, fence, required, local_epoch, namespace-or-empty)`.
type WireRefuse = (u8, u64, WireVersion, u64, ByteBuf);
/// An abort for a fence: `(code 2 or 3, fence, required, local_epoch)`.
type WireFenceAbort = (u8, u64, WireVersion, u64);

fn v_out(v: ProtocolVersion) -> WireVersion {
    (v.major, v.minor, v.patch)
}
fn v_in(v: WireVersion) -> ProtocolVersion {
    ProtocolVersion {
        major: v.0,
        minor: v.1,
        patch: v.2,
    }
}
fn e_out(e: MaintenanceEpoch) -> WireEpoch {
    (e.identity_epoch, e.snapshot_epoch.0)
}
fn e_in(e: WireEpoch) -> MaintenanceEpoch {
    MaintenanceEpoch {
        identity_epoch: e.0,
        snapshot_epoch: Epoch(e.1),
    }
}
fn f_out(f: FenceStatus) -> WireFence {
    match f {
        FenceStatus::Satisfied => (0, 0, (0, 0, 0), 0),
        FenceStatus::NotSatisfied {
            fence,
            required,
            local_epoch,
        } => (1, fence.0, v_out(required), local_epoch.0),
    }
}
fn f_in(f: WireFence) -> Result<FenceStatus, MessageError> {
    match f {
        (0, 0, (0, 0, 0), 0) => Ok(FenceStatus::Satisfied),
        (1, fence, required, local) => Ok(FenceStatus::NotSatisfied {
            fence: Epoch(fence),
            required: v_in(required),
            local_epoch: Epoch(local),
        }),
        _ => Err(MessageError::Field("fence status")),
    }
}

/// The body of an abort: `(code, from, to)` for codes 0 and 1, and
/// `(code, fence, required, local_epoch)` for the fence codes 2 (the sender) and 3 (the
/// receiver).
fn abort_out(r: &AbortReason) -> Vec<u8> {
    match r {
        AbortReason::EpochAdvanced { from, to } => to_canonical(&(0u8, *from, *to)),
        AbortReason::Closed => to_canonical(&(1u8, 0u64, 0u64)),
        AbortReason::FenceNotSatisfied {
            fence,
            required,
            local_epoch,
        } => to_canonical::<WireFenceAbort>(&(2, fence.0, v_out(*required), local_epoch.0)),
        AbortReason::PeerFenceNotSatisfied {
            fence,
            required,
            local_epoch,
        } => to_canonical::<WireFenceAbort>(&(3, fence.0, v_out(*required), local_epoch.0)),
    }
}

fn refuse_out(r: &RefuseReason) -> WireRefuse {
    let none = ByteBuf::new();
    match r {
        RefuseReason::NotAuthorized => (0, 0, (0, 0, 0), 0, none),
        RefuseReason::UnknownNamespace(ns) => (1, 0, (0, 0, 0), 0, ByteBuf::from(ns.to_bytes())),
        RefuseReason::IncompatibleProtocol { theirs, ours } => {
            // `theirs` travels in the fence slot's version, `ours` in a second version.
            let mut b = Vec::with_capacity(6);
            for x in [ours.major, ours.minor, ours.patch] {
                b.extend_from_slice(&x.to_be_bytes());
            }
            (2, 0, v_out(*theirs), 0, ByteBuf::from(b))
        }
        RefuseReason::FenceNotSatisfied {
            fence,
            required,
            local_epoch,
        } => (3, fence.0, v_out(*required), local_epoch.0, none),
        RefuseReason::PeerFenceNotSatisfied {
            fence,
            required,
            local_epoch,
        } => (4, fence.0, v_out(*required), local_epoch.0, none),
        RefuseReason::Busy => (5, 0, (0, 0, 0), 0, none),
        // The wait travels in the fence slot.
        RefuseReason::RateLimited { retry_after_ms } => (6, *retry_after_ms, (0, 0, 0), 0, none),
    }
}

fn refuse_in(w: WireRefuse) -> Result<RefuseReason, MessageError> {
    let (code, fence, version, local, extra) = w;
    let plain = fence == 0 && version == (0, 0, 0) && local == 0 && extra.is_empty();
    let fenced = |peer: bool| {
        let (fence, required, local_epoch) = (Epoch(fence), v_in(version), Epoch(local));
        if !extra.is_empty() {
            return Err(MessageError::Field("refusal"));
        }
        Ok(if peer {
            RefuseReason::PeerFenceNotSatisfied {
                fence,
                required,
                local_epoch,
            }
        } else {
            RefuseReason::FenceNotSatisfied {
                fence,
                required,
                local_epoch,
            }
        })
    };
    match code {
        0 if plain => Ok(RefuseReason::NotAuthorized),
        1 if fence == 0 && version == (0, 0, 0) && local == 0 => {
            JournalNamespace::from_bytes(&extra)
                .map(RefuseReason::UnknownNamespace)
                .ok_or(MessageError::Field("refusal namespace"))
        }
        2 if fence == 0 && local == 0 && extra.len() == 6 => {
            let u = |i: usize| u16::from_be_bytes([extra[i], extra[i + 1]]);
            Ok(RefuseReason::IncompatibleProtocol {
                theirs: v_in(version),
                ours: v_in((u(0), u(2), u(4))),
            })
        }
        3 => fenced(false),
        4 => fenced(true),
        5 if plain => Ok(RefuseReason::Busy),
        6 if version == (0, 0, 0) && local == 0 && extra.is_empty() => {
            Ok(RefuseReason::RateLimited {
                retry_after_ms: fence,
            })
        }
        _ => Err(MessageError::Field("refusal")),
    }
}

impl SyncMessage {
    /// A short name of the message kind, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            SyncMessage::Hello(_) => "hello",
            SyncMessage::Accept(_) => "accept",
            SyncMessage::Refuse(_) => "refuse",
            SyncMessage::Reconcile(_) => "reconcile",
            SyncMessage::Want(_) => "want",
            SyncMessage::WantIndexed { .. } => "want-indexed",
            SyncMessage::Facts(_) => "facts",
            SyncMessage::Done => "done",
            SyncMessage::Abort(_) => "abort",
        }
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let (t, body) = match self {
            SyncMessage::Hello(h) => {
                let w: WireHello = (
                    v_out(h.protocol),
                    h.namespace,
                    h.device,
                    e_out(h.epoch),
                    f_out(h.fence),
                    ByteBuf::from(h.reconcile.clone()),
                );
                (tag::HELLO, to_canonical(&w))
            }
            SyncMessage::Accept(a) => {
                let w: WireAccept = (
                    v_out(a.protocol),
                    a.device,
                    e_out(a.epoch),
                    f_out(a.fence),
                    ByteBuf::from(a.reconcile.clone()),
                );
                (tag::ACCEPT, to_canonical(&w))
            }
            SyncMessage::Refuse(r) => (tag::REFUSE, to_canonical(&refuse_out(r))),
            SyncMessage::Reconcile(m) => {
                (tag::RECONCILE, to_canonical(&serde_bytes::Bytes::new(m)))
            }
            SyncMessage::Want(ids) => (tag::WANT, to_canonical(ids)),
            SyncMessage::WantIndexed { answer, bits } => (
                tag::WANT_INDEXED,
                to_canonical(&(*answer, serde_bytes::Bytes::new(bits))),
            ),
            SyncMessage::Facts(facts) => {
                let v: Vec<&serde_bytes::Bytes> =
                    facts.iter().map(|f| serde_bytes::Bytes::new(f)).collect();
                (tag::FACTS, to_canonical(&v))
            }
            SyncMessage::Done => (tag::DONE, to_canonical(&())),
            SyncMessage::Abort(r) => (tag::ABORT, abort_out(r)),
        };
        to_canonical(&(SYNC_WIRE_VERSION, t, serde_bytes::Bytes::new(&body)))
    }

    /// Decodes a message of at most `max_len` bytes.
    pub fn decode(bytes: &[u8], max_len: usize) -> Result<Self, MessageError> {
        if bytes.len() > max_len {
            return Err(MessageError::Oversized {
                len: bytes.len(),
                max: max_len,
            });
        }
        // Peek at the version alone first, so a newer format gets a clear error rather
        // than a shape mismatch.
        if let Ok((v, _, _)) =
            serde_ipld_dagcbor::from_slice::<(u64, serde::de::IgnoredAny, serde::de::IgnoredAny)>(
                bytes,
            )
        {
            if v != SYNC_WIRE_VERSION {
                return Err(MessageError::UnsupportedVersion(v));
            }
        }
        let (_, t, body): (u64, u64, ByteBuf) = from_canonical(bytes)?;
        Ok(match t {
            tag::HELLO => {
                let (p, namespace, device, e, f, r): WireHello = from_canonical(&body)?;
                SyncMessage::Hello(Hello {
                    protocol: v_in(p),
                    namespace,
                    device,
                    epoch: e_in(e),
                    fence: f_in(f)?,
                    reconcile: r.into_vec(),
                })
            }
            tag::ACCEPT => {
                let (p, device, e, f, r): WireAccept = from_canonical(&body)?;
                SyncMessage::Accept(Accept {
                    protocol: v_in(p),
                    device,
                    epoch: e_in(e),
                    fence: f_in(f)?,
                    reconcile: r.into_vec(),
                })
            }
            tag::REFUSE => SyncMessage::Refuse(refuse_in(from_canonical(&body)?)?),
            tag::RECONCILE => SyncMessage::Reconcile(from_canonical::<ByteBuf>(&body)?.into_vec()),
            tag::WANT => SyncMessage::Want(from_canonical(&body)?),
            tag::WANT_INDEXED => {
                let (answer, bits): (u64, ByteBuf) = from_canonical(&body)?;
                SyncMessage::WantIndexed {
                    answer,
                    bits: bits.into_vec(),
                }
            }
            tag::FACTS => SyncMessage::Facts(
                from_canonical::<Vec<ByteBuf>>(&body)?
                    .into_iter()
                    .map(ByteBuf::into_vec)
                    .collect(),
            ),
            tag::DONE => {
                from_canonical::<()>(&body)?;
                SyncMessage::Done
            }
            tag::ABORT => match from_canonical::<(u8, u64, u64)>(&body) {
                Ok((0, from, to)) => SyncMessage::Abort(AbortReason::EpochAdvanced { from, to }),
                Ok((1, 0, 0)) => SyncMessage::Abort(AbortReason::Closed),
                Ok(_) => return Err(MessageError::Field("abort reason")),
                Err(_) => {
                    let (code, fence, required, local) = from_canonical::<WireFenceAbort>(&body)?;
                    let (fence, required, local_epoch) =
                        (Epoch(fence), v_in(required), Epoch(local));
                    SyncMessage::Abort(match code {
                        2 => AbortReason::FenceNotSatisfied {
                            fence,
                            required,
                            local_epoch,
                        },
                        3 => AbortReason::PeerFenceNotSatisfied {
                            fence,
                            required,
                            local_epoch,
                        },
                        _ => return Err(MessageError::Field("abort reason")),
                    })
                }
            },
            other => return Err(MessageError::UnknownTag(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tend_core::{AuthorityId, ContextId};

    fn samples() -> Vec<SyncMessage> {
        let v = ProtocolVersion::CURRENT;
        let fence = FenceStatus::NotSatisfied {
            fence: Epoch(9),
            required: v,
            local_epoch: Epoch(3),
        };
        vec![
            SyncMessage::Hello(Hello {
                protocol: v,
                namespace: JournalNamespace::Authority(AuthorityId([4; 32])),
                device: DeviceId([5; 32]),
                epoch: MaintenanceEpoch {
                    identity_epoch: 2,
                    snapshot_epoch: Epoch(7),
                },
                fence: FenceStatus::Satisfied,
                reconcile: vec![0x61, 0, 0],
            }),
            SyncMessage::Accept(Accept {
                protocol: v,
                device: DeviceId([6; 32]),
                epoch: MaintenanceEpoch::default(),
                fence,
                reconcile: vec![0x61],
            }),
            SyncMessage::Refuse(RefuseReason::NotAuthorized),
            SyncMessage::Refuse(RefuseReason::Busy),
            SyncMessage::Refuse(RefuseReason::UnknownNamespace(JournalNamespace::Context(
                ContextId([1; 32]),
            ))),
            SyncMessage::Refuse(RefuseReason::IncompatibleProtocol {
                theirs: ProtocolVersion {
                    major: 2,
                    minor: 1,
                    patch: 0,
                },
                ours: v,
            }),
            SyncMessage::Refuse(RefuseReason::FenceNotSatisfied {
                fence: Epoch(9),
                required: v,
                local_epoch: Epoch(3),
            }),
            SyncMessage::Refuse(RefuseReason::PeerFenceNotSatisfied {
                fence: Epoch(9),
                required: v,
                local_epoch: Epoch(3),
            }),
            SyncMessage::Reconcile(vec![0x61, 1, 2, 3]),
            SyncMessage::Want(vec![FactId([1; 32]), FactId([2; 32])]),
            SyncMessage::WantIndexed {
                answer: 3,
                bits: vec![0b1010_0001, 0],
            },
            SyncMessage::Facts(vec![vec![1, 2], vec![], vec![3]]),
            SyncMessage::Done,
            SyncMessage::Abort(AbortReason::EpochAdvanced { from: 1, to: 2 }),
            SyncMessage::Abort(AbortReason::Closed),
            SyncMessage::Abort(AbortReason::FenceNotSatisfied {
                fence: Epoch(9),
                required: v,
                local_epoch: Epoch(11),
            }),
            SyncMessage::Abort(AbortReason::PeerFenceNotSatisfied {
                fence: Epoch(9),
                required: v,
                local_epoch: Epoch(9),
            }),
            SyncMessage::Refuse(RefuseReason::RateLimited {
                retry_after_ms: 250,
            }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let b = m.encode();
            assert_eq!(
                SyncMessage::decode(&b, DEFAULT_MAX_MESSAGE_BYTES).unwrap(),
                m
            );
        }
    }

    #[test]
    fn garbage_gives_typed_errors() {
        let ok = SyncMessage::Done.encode();
        assert!(matches!(
            SyncMessage::decode(&ok, 2),
            Err(MessageError::Oversized { .. })
        ));
        let v2 = to_canonical(&(2u64, tag::DONE, serde_bytes::Bytes::new(&[0xf6])));
        assert_eq!(
            SyncMessage::decode(&v2, 1 << 20),
            Err(MessageError::UnsupportedVersion(2))
        );
        let unknown = to_canonical(&(1u64, 99u64, serde_bytes::Bytes::new(&[0xf6])));
        assert_eq!(
            SyncMessage::decode(&unknown, 1 << 20),
            Err(MessageError::UnknownTag(99))
        );
        for junk in [&[][..], &[0xff; 10], &[0x83, 0x01, 0x06], b"hello world"] {
            assert!(SyncMessage::decode(junk, 1 << 20).is_err());
        }
        // Truncations and bit flips of every sample never panic.
        for m in samples() {
            let b = m.encode();
            for i in 0..b.len() {
                let _ = SyncMessage::decode(&b[..i], 1 << 20);
                let mut c = b.clone();
                c[i] ^= 0x41;
                let _ = SyncMessage::decode(&c, 1 << 20);
            }
        }
    }
}
