//! A clock shared by every process on the machine.
//!
//! Latency is measured across processes (the publisher runs in the parent,
//! subscribers in child processes), so timestamps come from
//! `CLOCK_MONOTONIC`, which all processes on one machine share, in
//! nanoseconds.

/// Nanoseconds of `CLOCK_MONOTONIC`.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}
