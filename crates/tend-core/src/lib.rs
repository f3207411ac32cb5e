//! The pure core of tend: ids, epochs, signed facts, the journal semilattice, the
//! maintenance reducer and the application state.
//!
//! Nothing here does I/O, reads a clock or draws randomness: time and randomness come in as
//! arguments, so every rule can be tested deterministically.

pub mod admin;
pub mod app;
pub mod authority;
pub mod data;
pub mod encoding;
pub mod error;
pub mod fact;
pub mod hashing;
pub mod ids;
pub mod journal;
pub mod maintenance;
pub mod reduce;
pub mod upgrade;
pub mod vault;

pub use app::{AppState, DataOp};
pub use authority::{AuthorityFact, AuthorityGenesis, GroupKey, MembershipChange};
pub use error::{DecodeError, JournalError};
pub use fact::{
    Fact, FactFormat, Payload, UnsignedFact, VerifiedFact, FACT_FORMAT_VERSION, MAX_FACT_BYTES,
    TIMED_FACTS_SINCE, TIMED_FACT_FORMAT, ZIP215_FACTS_SINCE, ZIP215_FACT_FORMAT,
};
pub use ids::{
    AuthorityId, ContentId, ContextId, DeviceId, Epoch, FactId, Hash32, JournalNamespace,
    MaintenanceEpoch, ProtocolVersion,
};
pub use journal::{prefix_digest, Journal, SnapshotBase};
pub use maintenance::MaintenanceFact;
pub use reduce::{reduce, MaintenanceState};
