//! `herald doctor`: checks the host against the production checklist
//! (docs/production.md) for the configuration given, one line per item:
//! pass, warn or fail, with the fix. Any fail makes the exit status
//! non-zero, so it can gate a deploy.
//!
//! Each check is a pure function of what it reads, so tests feed it values;
//! [`run`] reads the real host.

use std::fmt;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::load::MemoryLimit;
use crate::tls::TlsMaterial;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "pass",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        })
    }
}

/// One checklist item's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub item: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do about it (empty on pass).
    pub fix: String,
}

impl Finding {
    fn pass(item: &'static str, detail: impl Into<String>) -> Finding {
        Finding {
            item,
            verdict: Verdict::Pass,
            detail: detail.into(),
            fix: String::new(),
        }
    }

    fn warn(item: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            item,
            verdict: Verdict::Warn,
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    fn fail(item: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            item,
            verdict: Verdict::Fail,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4}  {:<16} {}", self.verdict, self.item, self.detail)?;
        if !self.fix.is_empty() {
            write!(f, " -> fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// File descriptors a node needs: one per client connection, plus room for
/// listeners, peers, history files and the runtime.
pub fn fds_needed(max_connections: usize) -> u64 {
    max_connections as u64 + max_connections as u64 / 10 + 256
}

/// The node raises its soft limit to the hard one at start, so the hard
/// limit is what counts.
pub fn check_fd_limit(soft: u64, hard: u64, max_connections: usize) -> Finding {
    let needed = fds_needed(max_connections);
    let detail = format!("open files soft {soft}, hard {hard}; {needed} needed for client.max_connections = {max_connections}");
    if hard >= needed {
        Finding::pass("fd-limit", detail)
    } else {
        Finding::fail(
            "fd-limit",
            detail,
            format!("raise the hard limit to at least {needed} (systemd: LimitNOFILE={needed}; shell: ulimit -Hn), or lower client.max_connections"),
        )
    }
}

pub fn check_somaxconn(somaxconn: Option<u64>) -> Finding {
    match somaxconn {
        Some(v) if v >= 4096 => Finding::pass("somaxconn", format!("net.core.somaxconn = {v}")),
        Some(v) => Finding::warn(
            "somaxconn",
            format!("net.core.somaxconn = {v}: a reconnect storm overflows the accept queue"),
            "sysctl -w net.core.somaxconn=65535 (deploy/sysctl/90-herald.conf)",
        ),
        None => Finding::warn(
            "somaxconn",
            "cannot read net.core.somaxconn",
            "check /proc/sys/net/core/somaxconn",
        ),
    }
}

pub fn check_syn_backlog(backlog: Option<u64>) -> Finding {
    match backlog {
        Some(v) if v >= 4096 => {
            Finding::pass("syn-backlog", format!("net.ipv4.tcp_max_syn_backlog = {v}"))
        }
        Some(v) => Finding::warn(
            "syn-backlog",
            format!("net.ipv4.tcp_max_syn_backlog = {v}"),
            "sysctl -w net.ipv4.tcp_max_syn_backlog=65535 (deploy/sysctl/90-herald.conf)",
        ),
        None => Finding::warn(
            "syn-backlog",
            "cannot read net.ipv4.tcp_max_syn_backlog",
            "check /proc/sys/net/ipv4/tcp_max_syn_backlog",
        ),
    }
}

/// `tcp_rmem`/`tcp_wmem` defaults are what every idle connection may hold
/// in kernel buffers; `rmem_max` caps the receive buffer the QUIC socket
/// between nodes asks for ([`crate::transport::quic::UDP_BUFFER_BYTES`]).
pub fn check_tcp_buffers(
    tcp_rmem: Option<[u64; 3]>,
    tcp_wmem: Option<[u64; 3]>,
    rmem_max: Option<u64>,
) -> Finding {
    let (Some(r), Some(w), Some(udp)) = (tcp_rmem, tcp_wmem, rmem_max) else {
        return Finding::warn(
            "tcp-buffers",
            "cannot read tcp_rmem, tcp_wmem or rmem_max",
            "check /proc/sys/net/ipv4/tcp_rmem and /proc/sys/net/core/rmem_max",
        );
    };
    let detail = format!(
        "tcp_rmem {} {} {}, tcp_wmem {} {} {}, rmem_max {udp}",
        r[0], r[1], r[2], w[0], w[1], w[2]
    );
    if udp < crate::transport::quic::UDP_BUFFER_BYTES as u64 {
        return Finding::warn(
            "tcp-buffers",
            detail,
            "sysctl -w net.core.rmem_max=8388608 net.core.wmem_max=8388608 (the QUIC socket between nodes asks for 4 MiB and gets at most rmem_max; bursts drop datagrams below)",
        );
    }
    Finding::pass("tcp-buffers", detail)
}

/// Estimated memory a node needs at `max_connections`: user space (about
/// 7 KiB per idle subscribed connection, docs/benchmarks.md) plus kernel
/// socket buffers at their defaults, plus a base.
pub fn memory_needed(max_connections: usize, tcp_rmem_default: u64, tcp_wmem_default: u64) -> u64 {
    // Idle sockets rarely fill their buffers; a quarter is a fair average.
    let per_connection = 7 * 1024 + (tcp_rmem_default + tcp_wmem_default) / 4;
    max_connections as u64 * per_connection + 256 * 1024 * 1024
}

pub fn check_memory(limit: Option<u64>, needed: u64, max_connections: usize) -> Finding {
    match limit {
        None => Finding::warn(
            "memory-limit",
            "no cgroup memory limit and no admin.memory_limit: /readyz cannot report memory pressure",
            "run under systemd with MemoryMax= (deploy/systemd/herald.service) or set admin.memory_limit",
        ),
        Some(limit) if limit >= needed => Finding::pass(
            "memory-limit",
            format!("limit {} MiB; about {} MiB needed at client.max_connections = {max_connections}", limit >> 20, needed >> 20),
        ),
        Some(limit) => Finding::warn(
            "memory-limit",
            format!("limit {} MiB is below the about {} MiB needed at client.max_connections = {max_connections}", limit >> 20, needed >> 20),
            "raise MemoryMax or lower client.max_connections",
        ),
    }
}

/// Topic history is the one store that grows with traffic rather than with
/// connections: it needs a bound, and one the memory limit can hold.
pub fn check_history(max_bytes: usize, limit: Option<u64>) -> Finding {
    let max = max_bytes as u64;
    match limit {
        _ if max == 0 => Finding::warn(
            "history-memory",
            "history.max_bytes is 0: topic histories have no node-wide bound",
            "set history.max_bytes (deploy/systemd/herald.toml: 2 GiB with MemoryMax=8G)",
        ),
        Some(limit) if max > limit / 2 => Finding::warn(
            "history-memory",
            format!(
                "history.max_bytes {} MiB is over half the memory limit {} MiB",
                max >> 20,
                limit >> 20
            ),
            "lower history.max_bytes or raise MemoryMax",
        ),
        _ => Finding::pass(
            "history-memory",
            format!("history.max_bytes {} MiB", max >> 20),
        ),
    }
}

/// `cpu.max` is "QUOTA PERIOD" or "max PERIOD".
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut parts = text.split_whitespace();
    let quota = parts.next()?;
    let period: f64 = parts.next()?.parse().ok()?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    Some(quota.parse::<f64>().ok()? / period)
}

pub fn check_cpu(cpus: Option<f64>, worker_threads: usize) -> Finding {
    match cpus {
        None => Finding::pass(
            "cpu-quota",
            format!("no cgroup CPU quota; {worker_threads} worker threads"),
        ),
        Some(cpus) if (worker_threads as f64) <= cpus.ceil() => Finding::pass(
            "cpu-quota",
            format!("CPU quota {cpus:.2} CPUs; {worker_threads} worker threads"),
        ),
        Some(cpus) => Finding::warn(
            "cpu-quota",
            format!("CPU quota {cpus:.2} CPUs but {worker_threads} worker threads: threads get throttled, latency spikes"),
            format!("set node.worker_threads = {}", cpus.ceil().max(1.0) as u64),
        ),
    }
}

/// `/sys/fs/selinux/enforce`: "1" enforcing, "0" permissive, absent off.
pub fn check_selinux(enforce: Option<&str>) -> Finding {
    match enforce.map(str::trim) {
        Some("1") => Finding::pass("selinux", "enforcing"),
        Some("0") => Finding::warn(
            "selinux",
            "permissive: the herald policy logs denials but does not confine",
            "setenforce 1 (and SELINUX=enforcing in /etc/selinux/config) once the herald module is installed",
        ),
        _ => Finding::warn(
            "selinux",
            "not enabled on this host",
            "on SELinux hosts install deploy/selinux (docs/production.md); elsewhere rely on the systemd sandbox",
        ),
    }
}

pub fn check_port(item: &'static str, addr: SocketAddr, udp: bool) -> Finding {
    let result = if udp {
        UdpSocket::bind(addr).map(drop)
    } else {
        TcpListener::bind(addr).map(drop)
    };
    let proto = if udp { "udp" } else { "tcp" };
    match result {
        Ok(()) => Finding::pass(item, format!("{addr}/{proto} is free")),
        Err(e) => Finding::fail(
            item,
            format!("cannot bind {addr}/{proto}: {e}"),
            "stop what holds it (ss -lntup | grep PORT) or choose another port",
        ),
    }
}

/// Certificate expiry: fail when expired, warn within 30 days.
pub fn check_expiry(item: &'static str, not_after: SystemTime, now: SystemTime) -> Finding {
    const SOON: Duration = Duration::from_secs(30 * 24 * 3600);
    match not_after.duration_since(now) {
        Err(_) => Finding::fail(
            item,
            "expired",
            "issue a new certificate (herald cert node) and restart the node",
        ),
        Ok(left) if left < SOON => Finding::warn(
            item,
            format!("expires in {} days", left.as_secs() / 86_400),
            "issue a new certificate before it expires (herald cert node)",
        ),
        Ok(left) => Finding::pass(
            item,
            format!("valid for {} more days", left.as_secs() / 86_400),
        ),
    }
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_triple(path: &str) -> Option<[u64; 3]> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut values = text.split_whitespace().map(|v| v.parse::<u64>());
    Some([
        values.next()?.ok()?,
        values.next()?.ok()?,
        values.next()?.ok()?,
    ])
}

fn fd_limits() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return (0, 0);
    }
    (limit.rlim_cur, limit.rlim_max)
}

fn cgroup_cpus() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let file = Path::new("/sys/fs/cgroup")
        .join(path.trim_start_matches('/'))
        .join("cpu.max");
    parse_cpu_max(&std::fs::read_to_string(file).ok()?)
}

/// Every check against this host, for `config`.
pub fn examine(config: &Config) -> Vec<Finding> {
    let max = config.client.max_connections;
    let (soft, hard) = fd_limits();
    let rmem = read_triple("/proc/sys/net/ipv4/tcp_rmem");
    let wmem = read_triple("/proc/sys/net/ipv4/tcp_wmem");
    let mut findings = vec![
        check_fd_limit(soft, hard, max),
        check_somaxconn(read_u64("/proc/sys/net/core/somaxconn")),
        check_syn_backlog(read_u64("/proc/sys/net/ipv4/tcp_max_syn_backlog")),
        check_tcp_buffers(rmem, wmem, read_u64("/proc/sys/net/core/rmem_max")),
    ];
    let limit = MemoryLimit::detect(config.admin.memory_limit)
        .read()
        .map(|m| m.limit);
    let needed = memory_needed(
        max,
        rmem.map_or(131_072, |r| r[1]),
        wmem.map_or(16_384, |w| w[1]),
    );
    findings.push(check_memory(limit, needed, max));
    findings.push(check_history(config.history.max_bytes, limit));
    let threads = config
        .node
        .worker_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    findings.push(check_cpu(cgroup_cpus(), threads));
    let enforce = std::fs::read_to_string("/sys/fs/selinux/enforce").ok();
    findings.push(check_selinux(enforce.as_deref()));
    findings.push(check_port("client-port", config.client.listen, false));
    findings.push(check_port("admin-port", config.admin.listen, false));
    if config.clustered() {
        findings.push(check_port("cluster-port", config.cluster.listen, true));
        findings.push(check_port("gossip-port", config.gossip.listen, true));
        match TlsMaterial::from_config(&config.cluster) {
            Err(e) => findings.push(Finding::fail(
                "certificates",
                e.to_string(),
                "make them with herald cert ca / herald cert node (docs/cluster.md)",
            )),
            Ok(material) => {
                if material.node_id() != config.node.id {
                    findings.push(Finding::fail(
                        "certificates",
                        format!(
                            "cluster.cert is for {} but node.id is {}",
                            material.node_id(),
                            config.node.id
                        ),
                        "use the certificate made for this node id",
                    ));
                } else {
                    findings.push(Finding::pass(
                        "certificates",
                        format!("{} signed by the cluster CA", material.node_id()),
                    ));
                }
                let now = SystemTime::now();
                findings.push(check_expiry("cert-expiry", material.not_after(), now));
                findings.push(check_expiry("ca-expiry", material.ca_not_after(), now));
            }
        }
    } else if !config.cluster.seeds.is_empty() {
        findings.push(Finding::fail(
            "certificates",
            "seeds are set but cluster.ca, cluster.cert or cluster.key is missing",
            "make them with herald cert ca / herald cert node (docs/cluster.md)",
        ));
    }
    findings
}

/// Prints every finding; true when none failed.
pub fn run(config: &Config) -> bool {
    let findings = examine(config);
    for finding in &findings {
        println!("{finding}");
    }
    let fails = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Fail)
        .count();
    let warns = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Warn)
        .count();
    println!(
        "herald doctor: {} checks, {fails} failed, {warns} warnings",
        findings.len()
    );
    fails == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_limit_counts_the_hard_limit() {
        assert_eq!(check_fd_limit(1024, 100_000, 50_000).verdict, Verdict::Pass);
        let low = check_fd_limit(1024, 20_000, 50_000);
        assert_eq!(low.verdict, Verdict::Fail);
        assert!(low.fix.contains("LimitNOFILE=55256"), "{}", low.fix);
    }

    #[test]
    fn backlogs_below_4096_warn() {
        assert_eq!(check_somaxconn(Some(65535)).verdict, Verdict::Pass);
        assert_eq!(check_somaxconn(Some(128)).verdict, Verdict::Warn);
        assert_eq!(check_somaxconn(None).verdict, Verdict::Warn);
        assert_eq!(check_syn_backlog(Some(512)).verdict, Verdict::Warn);
    }

    #[test]
    fn small_udp_buffers_warn() {
        let tcp = Some([4096, 131_072, 6_291_456]);
        assert_eq!(
            check_tcp_buffers(tcp, tcp, Some(212_992)).verdict,
            Verdict::Warn
        );
        assert_eq!(
            check_tcp_buffers(tcp, tcp, Some(4_194_303)).verdict,
            Verdict::Warn
        );
        assert_eq!(
            check_tcp_buffers(tcp, tcp, Some(8_388_608)).verdict,
            Verdict::Pass
        );
    }

    #[test]
    fn memory_limit_against_connections() {
        let needed = memory_needed(50_000, 131_072, 16_384);
        assert_eq!(check_memory(None, needed, 50_000).verdict, Verdict::Warn);
        assert_eq!(
            check_memory(Some(needed), needed, 50_000).verdict,
            Verdict::Pass
        );
        assert_eq!(
            check_memory(Some(needed / 2), needed, 50_000).verdict,
            Verdict::Warn
        );
    }

    #[test]
    fn history_needs_a_bound_the_memory_limit_holds() {
        let gib = 1usize << 30;
        assert_eq!(check_history(0, Some(8 << 30)).verdict, Verdict::Warn);
        assert_eq!(check_history(2 * gib, Some(8 << 30)).verdict, Verdict::Pass);
        assert_eq!(check_history(2 * gib, None).verdict, Verdict::Pass);
        assert_eq!(check_history(5 * gib, Some(8 << 30)).verdict, Verdict::Warn);
    }

    #[test]
    fn cpu_quota_against_worker_threads() {
        assert_eq!(parse_cpu_max("max 100000"), None);
        assert_eq!(parse_cpu_max("150000 100000"), Some(1.5));
        assert_eq!(check_cpu(Some(1.5), 2).verdict, Verdict::Pass);
        let over = check_cpu(Some(1.0), 4);
        assert_eq!(over.verdict, Verdict::Warn);
        assert!(over.fix.contains("worker_threads = 1"));
        assert_eq!(check_cpu(None, 8).verdict, Verdict::Pass);
    }

    #[test]
    fn selinux_modes() {
        assert_eq!(check_selinux(Some("1\n")).verdict, Verdict::Pass);
        assert_eq!(check_selinux(Some("0")).verdict, Verdict::Warn);
        assert_eq!(check_selinux(None).verdict, Verdict::Warn);
    }

    #[test]
    fn a_taken_port_fails() {
        let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = holder.local_addr().expect("addr");
        assert_eq!(
            check_port("client-port", addr, false).verdict,
            Verdict::Fail
        );
        drop(holder);
        assert_eq!(
            check_port("client-port", addr, false).verdict,
            Verdict::Pass
        );
    }

    #[test]
    fn expiry_windows() {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        assert_eq!(
            check_expiry("cert-expiry", now - day, now).verdict,
            Verdict::Fail
        );
        assert_eq!(
            check_expiry("cert-expiry", now + 10 * day, now).verdict,
            Verdict::Warn
        );
        assert_eq!(
            check_expiry("cert-expiry", now + 300 * day, now).verdict,
            Verdict::Pass
        );
    }

    #[test]
    fn findings_print_one_line_with_the_fix() {
        let line = check_somaxconn(Some(128)).to_string();
        assert!(line.starts_with("warn  somaxconn"), "{line}");
        assert!(line.contains("-> fix: sysctl -w net.core.somaxconn=65535"));
        assert!(!line.contains('\n'));
    }
}
