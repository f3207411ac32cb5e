//! Which open sync sessions an activated upgrade fence ends (DESIGN rule 7), decided once
//! for the running node and the simulator.

use tend_core::{MaintenanceState, ProtocolVersion};
use tend_sync::{AbortReason, Role, Session};

/// Why a fence ends `session`, if it does: every session of this journal while this
/// device's own release (`running`, `None` if unknown) does not meet a fence it is past;
/// and, on the responder's side, a session whose initiator announced a release below such
/// a fence. (An initiator does not judge its responder's release, so an old device can
/// still be reached and learn of the activation.) The caller aborts those sessions, which
/// tells each peer why.
pub fn fence_abort(
    state: &MaintenanceState,
    running: Option<ProtocolVersion>,
    session: &Session,
) -> Option<AbortReason> {
    if session.namespace() != state.namespace || state.active_fence().is_none() {
        return None;
    }
    let local_epoch = state.current_epoch();
    if let Some(r) = running.and_then(|v| state.fence_check(local_epoch, v).err()) {
        return Some(AbortReason::FenceNotSatisfied {
            fence: r.fence,
            required: r.required,
            local_epoch: r.local_epoch,
        });
    }
    if session.role() != Role::Responder {
        return None;
    }
    let r = state
        .fence_check_peer(local_epoch, session.peer_protocol()?)
        .err()?;
    Some(AbortReason::PeerFenceNotSatisfied {
        fence: r.fence,
        required: r.required,
        local_epoch: r.local_epoch,
    })
}
