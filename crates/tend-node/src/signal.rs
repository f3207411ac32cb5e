//! Stopping on SIGTERM or SIGINT (Ctrl-C elsewhere). The handlers are installed when
//! [`stop_requested`] is called, not when its future is first polled, so a process that
//! calls it before announcing that it started stops cleanly however soon the signal
//! follows (a SIGTERM in between would otherwise kill it with the default action).

use std::future::Future;

/// Installs the handlers now; the future ends at the first SIGTERM or SIGINT. Must be
/// called inside a tokio runtime.
pub(crate) fn stop_requested() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
