//! Load signals for readiness: how late the runtime runs timers (scheduling
//! lag), and how close the process is to its memory limit.
//!
//! A load balancer that health-checks `/readyz` stops sending new clients to
//! a node that is falling behind before its clients notice.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the lag probe wakes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Samples the reported lag is the maximum of (about one second).
const WINDOW: usize = 10;

/// The runtime's recent scheduling lag: how much later than asked a timer
/// fired, the worst of the last second.
#[derive(Debug, Default)]
pub struct SchedulingLag {
    micros: AtomicU64,
}

impl SchedulingLag {
    /// Starts the probe task on the current runtime.
    pub fn start() -> Arc<SchedulingLag> {
        let lag = Arc::new(SchedulingLag::default());
        let probe = lag.clone();
        tokio::spawn(async move {
            let mut recent = [0u64; WINDOW];
            let mut at = 0;
            loop {
                let asked = tokio::time::Instant::now() + PROBE_INTERVAL;
                tokio::time::sleep_until(asked).await;
                let late = tokio::time::Instant::now().saturating_duration_since(asked);
                recent[at] = late.as_micros() as u64;
                at = (at + 1) % WINDOW;
                let worst = recent.iter().copied().max().unwrap_or(0);
                probe.micros.store(worst, Ordering::Relaxed);
                crate::metrics::METRICS
                    .scheduling_lag_micros
                    .set(worst as i64);
            }
        });
        lag
    }

    pub fn get(&self) -> Duration {
        Duration::from_micros(self.micros.load(Ordering::Relaxed))
    }
}

/// Memory in use against the limit that applies to this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUse {
    pub used: u64,
    pub limit: u64,
}

impl MemoryUse {
    pub fn fraction(&self) -> f64 {
        if self.limit == 0 {
            return 0.0;
        }
        self.used as f64 / self.limit as f64
    }
}

/// Where the memory limit comes from.
#[derive(Debug, Clone)]
pub enum MemoryLimit {
    /// The cgroup's limit and usage files (v2 `memory.max`/`memory.current`,
    /// or v1 `memory.limit_in_bytes`/`memory.usage_in_bytes`).
    Cgroup { limit: PathBuf, usage: PathBuf },
    /// A configured budget, compared with the process's resident memory.
    Configured(u64),
    /// No limit known: memory never makes the node unready.
    None,
}

impl MemoryLimit {
    /// A configured budget wins; else the cgroup's limit, when it sets one.
    pub fn detect(configured: Option<u64>) -> MemoryLimit {
        if let Some(bytes) = configured {
            return MemoryLimit::Configured(bytes);
        }
        match cgroup_files(Path::new("/proc/self/cgroup"), Path::new("/sys/fs/cgroup")) {
            Some((limit, usage)) => MemoryLimit::Cgroup { limit, usage },
            None => MemoryLimit::None,
        }
    }

    /// The current use; `None` when there is no limit or it cannot be read.
    pub fn read(&self) -> Option<MemoryUse> {
        match self {
            MemoryLimit::Cgroup { limit, usage } => {
                let limit = read_bytes(limit)?;
                let used = read_bytes(usage)?;
                Some(MemoryUse { used, limit })
            }
            MemoryLimit::Configured(limit) => Some(MemoryUse {
                used: resident_bytes()?,
                limit: *limit,
            }),
            MemoryLimit::None => None,
        }
    }
}

/// Values at or above this are "no limit" (cgroup v1 writes a huge number).
const UNLIMITED: u64 = 1 << 60;

fn read_bytes(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    if text == "max" {
        return None;
    }
    text.parse().ok().filter(|v| *v < UNLIMITED)
}

/// The limit and usage files of this process's memory cgroup, when the
/// cgroup has a limit.
fn cgroup_files(proc_cgroup: &Path, root: &Path) -> Option<(PathBuf, PathBuf)> {
    let text = std::fs::read_to_string(proc_cgroup).ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let relative = path.trim_start_matches('/');
        let candidates: Vec<(PathBuf, PathBuf)> = if controllers.is_empty() {
            // cgroup v2: one unified hierarchy.
            let dir = root.join(relative);
            vec![(dir.join("memory.max"), dir.join("memory.current"))]
        } else if controllers.split(',').any(|c| c == "memory") {
            // cgroup v1: inside a container the cgroup's own directory is
            // usually mounted as the memory root.
            [root.join("memory").join(relative), root.join("memory")]
                .into_iter()
                .map(|dir| {
                    (
                        dir.join("memory.limit_in_bytes"),
                        dir.join("memory.usage_in_bytes"),
                    )
                })
                .collect()
        } else {
            continue;
        };
        for (limit, usage) in candidates {
            if read_bytes(&limit).is_some() && usage.exists() {
                return Some((limit, usage));
            }
        }
    }
    None
}

/// The process's resident set size.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("herald-load-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn cgroup_v2_limit_is_found() {
        let dir = scratch("v2");
        std::fs::write(dir.join("cgroup"), "0::/system.slice/herald.service\n").expect("write");
        let unit = dir.join("root/system.slice/herald.service");
        std::fs::create_dir_all(&unit).expect("dir");
        std::fs::write(unit.join("memory.max"), "1073741824\n").expect("write");
        std::fs::write(unit.join("memory.current"), "536870912\n").expect("write");
        let (limit, usage) = cgroup_files(&dir.join("cgroup"), &dir.join("root")).expect("found");
        let memory = MemoryLimit::Cgroup { limit, usage }.read().expect("read");
        assert_eq!(memory.fraction(), 0.5);
    }

    #[test]
    fn cgroup_without_a_limit_is_no_limit() {
        let dir = scratch("v2max");
        std::fs::write(dir.join("cgroup"), "0::/\n").expect("write");
        let root = dir.join("root");
        std::fs::create_dir_all(&root).expect("dir");
        std::fs::write(root.join("memory.max"), "max\n").expect("write");
        std::fs::write(root.join("memory.current"), "1\n").expect("write");
        assert!(cgroup_files(&dir.join("cgroup"), &root).is_none());
    }

    #[test]
    fn cgroup_v1_limit_is_found_and_huge_means_none() {
        let dir = scratch("v1");
        std::fs::write(dir.join("cgroup"), "4:memory:/docker/abc\n0::/\n").expect("write");
        let memory = dir.join("root/memory");
        std::fs::create_dir_all(&memory).expect("dir");
        std::fs::write(
            memory.join("memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .expect("write");
        std::fs::write(memory.join("memory.usage_in_bytes"), "1\n").expect("write");
        assert!(cgroup_files(&dir.join("cgroup"), &dir.join("root")).is_none());
        std::fs::write(memory.join("memory.limit_in_bytes"), "2048\n").expect("write");
        assert!(cgroup_files(&dir.join("cgroup"), &dir.join("root")).is_some());
    }

    #[test]
    fn a_configured_budget_compares_resident_memory() {
        let memory = MemoryLimit::detect(Some(1)).read().expect("read");
        assert!(memory.fraction() > 1.0);
    }
}
