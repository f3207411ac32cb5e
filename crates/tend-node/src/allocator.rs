//! Tuning of the C allocator for a process that runs many threads for a long time.
//!
//! glibc's malloc gives threads arenas of their own, up to eight per core, and memory freed
//! into one arena is not handed to a thread allocating from another: a node's tokio
//! workers and blocking threads (sync sessions, store transactions, signing) so hold
//! several copies of their peak. On two cores `tend devnet --facts 100000` peaked at
//! 1,354 MB with the default (sixteen arenas) and at 734 MB with two, in the same time
//! (BENCHMARKS.md, "devnet at 100,000 facts per device"). A `MALLOC_ARENA_MAX` set by the
//! user wins.

/// Limits glibc to one malloc arena per core (at least two), unless `MALLOC_ARENA_MAX`
/// says otherwise: threads on different cores still rarely wait for each other's arena.
/// Call it first in `main`, before any thread starts: the `tend` binary does, and so does
/// each node process of the ceremony bench.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn bound_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a tuning parameter of glibc's allocator; no other
        // thread exists yet to race with it. Its result (0 on failure) changes nothing we
        // rely on, so it is not checked.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Other allocators keep their own defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn bound_arenas() {}
