//! Tuning of the C allocator for a process that runs many threads for a long time.
//!
//! glibc's malloc gives threads arenas of their own, up to eight per core, and memory freed
//! into one arena is not handed to a thread allocating from another: a node's tokio
//! workers and blocking threads (sync sessions, store transactions, signing) so hold
//! several copies of their peak. `tend devnet --facts 100000` peaked at 1,354 MB with the
//! default and at 734 MB with two arenas, in the same time (BENCHMARKS.md, "devnet at
//! 100,000 facts per device"). A `MALLOC_ARENA_MAX` set by the user wins.

/// Limits glibc to two malloc arenas, unless `MALLOC_ARENA_MAX` says otherwise. Call it
/// first in `main`, before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn bound_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tuning parameter of glibc's allocator; no other
        // thread exists yet to race with it. Its result (0 on failure) changes nothing we
        // rely on, so it is not checked.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Other allocators keep their own defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn bound_arenas() {}
