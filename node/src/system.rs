//! What the node asks of the operating system at start.

use tracing::{info, warn};

/// Raises the soft limit on open files to the hard limit, logs both, and
/// warns when it cannot hold `max_connections` (plus room for everything
/// else the node opens).
pub fn raise_fd_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to / read from a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read RLIMIT_NOFILE");
        return;
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            warn!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_NOFILE");
        }
    }
    info!(
        soft_before = before,
        soft = limit.rlim_cur,
        hard = limit.rlim_max,
        "open file limit"
    );
    // Listeners, peers, logs and admin connections need some descriptors too.
    let needed = max_connections as u64 + 256;
    if limit.rlim_cur < needed {
        warn!(
            limit = limit.rlim_cur,
            max_connections,
            "the open file limit is below client.max_connections; connections past it will fail (raise LimitNOFILE / ulimit -n)"
        );
    }
}
