//! Sans-IO synchronisation of tend journals: negentropy v1 reconciliation over ordered
//! `(epoch, fact id)` items, sync sessions as state machines, a session manager, peer
//! selection and rate limits.
//!
//! Nothing here opens sockets, spawns threads, reads a clock or draws randomness: time
//! comes in as a `Duration` argument (since any origin the caller likes) and effects go out
//! as values ([`session::Action`], [`manager::ManagerAction`]). The node layer moves the
//! bytes and runs the timers.

pub mod items;
pub mod manager;
pub mod message;
pub mod peer;
pub mod rate;
pub mod reconcile;
pub mod session;

pub use items::{ItemStorage, MemItems, OrderedItems, SharedItems, SyncItem};
pub use manager::{ManagerAction, ManagerConfig, ManagerError, SessionId, SessionManager};
pub use message::{
    AbortReason, Accept, FenceStatus, Hello, MessageError, RefuseReason, SyncMessage,
    SYNC_WIRE_VERSION,
};
pub use peer::{PeerConfig, PeerManager, PeerMetadata, PeerStatus};
pub use rate::{Admit, Rate, RateConfig, RateLimits};
pub use reconcile::{InitiatorStep, ReconcileError, Reconciler, NEGENTROPY_V1};
pub use session::{
    Action, FactHost, FailReason, LocalView, Outcome, Role, Session, SessionConfig, SessionError,
    SessionResult, SessionStats,
};
