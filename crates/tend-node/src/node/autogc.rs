//! The GC policy on the running device: after each verified snapshot it adopts or
//! completes, a device whose policy is `prune` (the default) collects garbage by itself,
//! so its store stays bounded without an operator running `tend gc`.
//!
//! The node checks after every batch written, every local write and every timer tick
//! whether the latest verified snapshot is newer than the last one collected. Once that
//! snapshot's blob is in the store, one collection runs off the async workers: first this
//! device's facts below the snapshot that it does not cover are re-issued (so pruning
//! never drops the only copy of one), then [`Device::gc_automatic`] prunes, and compacts
//! when that freed enough to be worth rewriting the file (waiting for a moment when no
//! session holds the store, and trying again at the next check if none came). The epoch
//! collected is kept in the store's settings, so a restart does not collect the same snapshot again but does collect one
//! it missed while stopped. A `manual` or `archive` device is left alone; one switched to
//! `prune` while running collects from its next snapshot (or its next start).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tend_core::MaintenanceState;

use crate::device::{Device, GcPolicy};
use crate::metrics::Metrics;

/// Setting: the latest snapshot epoch this device collected garbage below by itself.
const COLLECTED: &str = "auto_gc_snapshot_epoch";

/// The node's automatic GC state.
pub(super) struct AutoGc {
    /// The latest snapshot epoch collected (or skipped by policy) so far.
    done: Arc<AtomicU64>,
    /// Whether a collection is running (one at a time).
    running: Arc<AtomicBool>,
}

impl AutoGc {
    /// Reads the epoch collected before this run.
    pub(super) fn load(device: &Device) -> Self {
        let done = device
            .store()
            .get_setting::<u64>(COLLECTED)
            .unwrap_or_else(|e| {
                tracing::warn!("cannot read the automatic GC setting: {e}");
                None
            })
            .unwrap_or(0);
        Self {
            done: Arc::new(AtomicU64::new(done)),
            running: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Waits (up to `limit`) for a running collection to end, so the store can be
    /// closed and reopened once the node has stopped.
    pub(super) async fn idle(&self, limit: std::time::Duration) {
        let until = std::time::Instant::now() + limit;
        while self.running.load(Ordering::SeqCst) && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Starts a collection if `state` holds a verified snapshot newer than the last one
    /// collected and its blob is stored. Cheap when there is nothing to do.
    pub(super) fn check(
        &self,
        device: &Arc<Device>,
        metrics: &Arc<Metrics>,
        state: &MaintenanceState,
    ) {
        let Some(latest) = state.latest_snapshot.as_ref() else {
            return;
        };
        let epoch = latest.snapshot.epoch.0;
        if epoch <= self.done.load(Ordering::SeqCst) {
            return;
        }
        // The blob says what the snapshot covers; re-issue needs it before pruning.
        if !device
            .store()
            .has_blob(&latest.snapshot.blob_cid)
            .unwrap_or(false)
        {
            return;
        }
        if self.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let (device, metrics) = (device.clone(), metrics.clone());
        let (done, running) = (self.done.clone(), self.running.clone());
        let job = move || {
            collect(&device, &metrics, &done, epoch);
            running.store(false, Ordering::SeqCst);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(job);
            }
            Err(_) => {
                std::thread::spawn(job);
            }
        }
    }
}

/// One collection below the snapshot at `epoch`.
fn collect(device: &Device, metrics: &Metrics, done: &AtomicU64, epoch: u64) {
    match device.gc_policy() {
        Ok(GcPolicy::Prune) => {}
        Ok(policy) => {
            tracing::debug!("GC policy {policy:?}: snapshot {epoch} left for the operator");
            done.fetch_max(epoch, Ordering::SeqCst);
            return;
        }
        Err(e) => {
            tracing::warn!("cannot read the GC policy: {e}");
            return;
        }
    }
    // This device's own uncovered facts get their new copies before the originals can go.
    match crate::reissue::reissue_uncovered(device) {
        Ok(r) if r.snapshot_epoch.map(|e| e.0) == Some(epoch) => {}
        // A newer snapshot arrived meanwhile, or the blob went: the next check decides.
        Ok(_) => return,
        Err(e) => {
            tracing::warn!("automatic GC: cannot re-issue uncovered facts: {e}");
            return;
        }
    }
    match device.gc_automatic() {
        Ok(report) => {
            metrics.gc_runs.inc();
            metrics.gc_facts_pruned.inc_by(report.facts_pruned);
            metrics.gc_bytes_reclaimed.inc_by(
                report
                    .store_bytes_before
                    .saturating_sub(report.store_bytes_after),
            );
            tracing::info!(
                "automatic GC below snapshot {epoch}: {} facts and {} blobs pruned, {} -> {} bytes{}",
                report.facts_pruned,
                report.blobs_pruned,
                report.store_bytes_before,
                report.store_bytes_after,
                if report.compacted {
                    ""
                } else if report.compaction_skipped {
                    " (not compacted: too little freed to rewrite the file)"
                } else {
                    " (compaction left for later: the store stayed busy)"
                }
            );
            // Not compacted because sessions kept the store busy for two seconds: the next
            // check prunes nothing more and tries to compact again.
            if report.compacted || report.compaction_skipped {
                done.fetch_max(epoch, Ordering::SeqCst);
                if let Err(e) = device.store().put_setting(COLLECTED, &epoch) {
                    tracing::warn!("cannot record the automatic GC: {e}");
                }
            }
        }
        Err(e) => tracing::warn!("automatic GC below snapshot {epoch} failed: {e}"),
    }
}
