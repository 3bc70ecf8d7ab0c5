//! The agent's heap and the C allocator under it (glibc's malloc, the agent's global
//! allocator). Each apply builds a new plan beside the old one and frees the old one; glibc
//! keeps freed memory in per-thread arenas and hands little of it back, so without this the
//! agent's RSS sat ~10 MiB above its live heap and crept up with every burst of pod churn (the
//! agent-memory bench's heap profile: the live heap back to the same 13.7 MiB after 500 pods
//! came and went while the RSS grew 10 %).
//!
//! It must not change what the agent allocates, only how much freed memory stays mapped.

/// Arenas for the whole process: a few threads allocate at all, and each arena keeps its own
/// free memory.
const ARENAS: i32 = 2;

/// Limits the allocator to [`ARENAS`] arenas. Call first thing in `main`, before any thread
/// starts.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of the allocator; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Hands the free memory at the top of each arena and the free whole pages inside them back to
/// the kernel. Called after each apply: a few milliseconds at a thousand pods, once per burst.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only returns free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}
