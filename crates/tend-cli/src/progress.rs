//! Progress on stderr for long waits, only on a terminal and never under `--json`: a bar
//! when the total is known (export, verify, restore on a stopped device), and a live line
//! polled from elsewhere when it is not (catching up with peers, or an export, through a
//! running device).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tend_backup::Progress;

/// How often a [`Watch`] polls.
const POLL_EVERY: Duration = Duration::from_millis(250);

fn shown(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// A bar of work done out of a known total.
pub struct ProgressBar(pub Option<indicatif::ProgressBar>);

impl ProgressBar {
    pub fn new(json: bool) -> Self {
        if !shown(json) {
            return Self(None);
        }
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::default_bar()
            .template("{bar:40} {percent:>3}% {pos}/{len} {elapsed}")
        {
            bar.set_style(style);
        }
        Self(Some(bar))
    }

    pub fn update(&self, p: Progress) {
        if let Some(bar) = &self.0 {
            bar.set_length(p.total);
            bar.set_position(p.done);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

impl Drop for ProgressBar {
    fn drop(&mut self) {
        // An error leaves no half-drawn bar in front of its message.
        self.finish();
    }
}

/// A spinner whose line `poll` writes, polled on a thread of its own while the caller
/// waits on something that reports nothing until it ends (a control-socket request).
/// Cleared when dropped.
pub struct Watch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    /// Shows `first`, then polls `poll` (`None` leaves the line as it was).
    pub fn start(
        json: bool,
        first: &str,
        mut poll: impl FnMut() -> Option<String> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if !shown(json) {
            return Self { stop, thread: None };
        }
        let spinner = indicatif::ProgressBar::new_spinner();
        if let Ok(style) =
            indicatif::ProgressStyle::default_spinner().template("{spinner} {msg} {elapsed}")
        {
            spinner.set_style(style);
        }
        spinner.set_message(first.to_owned());
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                if let Some(line) = poll() {
                    spinner.set_message(line);
                }
                spinner.tick();
                std::thread::sleep(POLL_EVERY);
            }
            spinner.finish_and_clear();
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
