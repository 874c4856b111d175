//! Clocks: one shared by every process on the machine, and the load
//! generator's own CPU time.
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

/// CPU seconds (user and system) this process and its waited-for children
/// have used: the load generator's share of a machine it shares with the
/// brokers. Subscriber child processes count once they have exited.
pub fn generator_cpu_secs() -> f64 {
    let used = |who: libc::c_int| {
        // SAFETY: an all-zero rusage is valid, and getrusage only writes it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid, writable rusage; `who` is one of the
        // two constants below.
        if unsafe { libc::getrusage(who, &mut usage) } != 0 {
            return 0.0;
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(usage.ru_utime) + secs(usage.ru_stime)
    };
    used(libc::RUSAGE_SELF) + used(libc::RUSAGE_CHILDREN)
}
