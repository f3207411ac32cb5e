//! Sans-IO synchronisation of tend journals: negentropy v1 reconciliation over ordered
//! `(epoch, fact id)` items, sync sessions as state machines, a session manager, peer
//! selection and rate limits.
//!
//! Nothing here opens sockets, spawns threads, reads a clock or draws randomness: time
//! comes in as a `Duration` argument (since any origin the caller likes) and effects go out
//! as values ([`session::Action`], [`manager::ManagerAction`]). The node layer moves the
//! bytes and runs the timers.
//!
//! Design: a session runs over one ordered, reliable stream. The initiator's `Hello`
//! carries the namespace, protocol version, `MaintenanceEpoch`, fence status and the first
//! negentropy v1 message; the responder refuses (with a reason the initiator can show) or
//! answers in `Accept`, so equal sets finish in one round trip. Negentropy runs over an
//! immutable snapshot of `(epoch, id)` items ([`OrderedItems`]; the negentropy crate's
//! `NegentropyStorageBase` is implemented over it). Only the initiator learns the
//! difference, so it pushes what the peer lacks and asks for what it lacks, by bit position
//! in the responder's id lists (`WantIndexed`, ~1 bit per id) or by id. Facts travel in
//! batches bounded by count and bytes, paced by governor-based rate limits on a clock the
//! caller drives; incoming sessions, messages and bytes are limited per peer and globally
//! too. Every incoming fact is decoded and verified and then admitted through the
//! caller's [`FactHost`]; invalid ones are counted by reason, and past a threshold the
//! session fails as misbehaviour after keeping the valid facts of the same batch. An
//! identity-epoch advance aborts sessions with a retryable outcome; a fence that becomes
//! unsatisfied mid-session aborts them with a reason the peer can show. The [`SessionManager`]
//! owns sessions and enforces global and per-peer limits; the [`PeerManager`] scores peers
//! (0.5 trust + 0.3 success rate + 0.2 (1 - load)) and picks them deterministically.

pub mod items;
pub mod manager;
pub mod message;
pub mod peer;
pub mod rate;
pub mod reconcile;
pub mod session;

pub use items::{ItemStorage, MemItems, OrderedItems, SharedItems, SyncItem};
pub use manager::{
    AdmittedSession, ManagerAction, ManagerConfig, ManagerError, SessionId, SessionManager,
};
pub use message::{
    AbortReason, Accept, FenceStatus, Hello, MessageError, RefuseReason, SyncMessage,
    SYNC_WIRE_VERSION,
};
pub use peer::{PeerConfig, PeerManager, PeerMetadata, PeerRecord, PeerStatus};
pub use rate::{
    Admit, Direction, InboundRate, InboundTicket, Kind, Limited, Rate, RateConfig, RateLimits,
    Scope,
};
pub use reconcile::{InitiatorStep, ReconcileError, Reconciler, NEGENTROPY_V1};
pub use session::{
    Action, FactHost, FailReason, LocalView, Outcome, Role, Session, SessionConfig, SessionError,
    SessionResult, SessionStats,
};
