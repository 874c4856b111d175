//! Starting, watching and stopping real `herald` processes.
//!
//! A [`NodeBuilder`] describes one node (id, ports, extra flags, environment,
//! seeds); [`NodeBuilder::start`] spawns it and waits until its admin
//! `/healthz` answers 200. A [`Node`] kills its process when dropped, and
//! prints the tail of the node's log when the test is failing.

use std::collections::HashSet;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::http::{self, HttpResponse};
use crate::metrics::Metrics;
use crate::ws::{WsClient, WsConnect};

/// How long a node may take to answer `/healthz` after it was spawned.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The `herald` binary under test: `HERALD_BIN`, else `target/<profile>/herald`
/// next to the directory holding the test executable, brought up to date
/// once per test process (`cargo test -p cluster-tests` alone does not
/// rebuild another package's binary, and a stale one tests old code).
pub fn herald_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("HERALD_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("HERALD_BIN={} does not exist", path.display());
        }
        return Ok(path);
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_herald().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_herald() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    // Test executables live in target/<profile>/deps/; the binary one level up.
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "-p", "node", "--bin", "herald"]);
    if release {
        build.arg("--release");
    }
    let status = build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .context("running cargo build for the herald binary")?;
    if !status.success() {
        bail!("cargo build --bin herald failed: {status}");
    }
    let bin = profile_dir.join("herald");
    if !bin.is_file() {
        bail!("{} was not built", bin.display());
    }
    Ok(bin)
}

/// Ports already handed out by this test process, so that parallel tests
/// never pick the same one.
fn taken_ports() -> &'static Mutex<HashSet<u16>> {
    static TAKEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    TAKEN.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_tcp_port() -> u16 {
    free_port(|| TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr().map(|a| a.port())))
}

/// A free UDP port on 127.0.0.1 (bound, read, released).
pub fn free_udp_port() -> u16 {
    free_port(|| UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr().map(|a| a.port())))
}

fn free_port(probe: impl Fn() -> std::io::Result<u16>) -> u16 {
    for _ in 0..100 {
        let port = probe().expect("bind 127.0.0.1:0");
        if taken_ports().lock().expect("port set").insert(port) {
            return port;
        }
    }
    panic!("no free port after 100 tries");
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A fresh, unique directory for one node's files (logs, config).
fn scratch_dir(id: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("herald-tests-{}-{}-{}", std::process::id(), n, id));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// Everything needed to start one node. Ports are picked when the builder is
/// made, so a cluster can wire seeds before any node runs.
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    pub id: String,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub cluster_addr: SocketAddr,
    pub gossip_addr: SocketAddr,
    /// Pass `--client-listen` (off when a test sets it by file or env).
    pub client_listen_flag: bool,
    pub seeds: Vec<SocketAddr>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub start_timeout: Duration,
}

impl NodeBuilder {
    /// A node with this id and fresh loopback ports.
    pub fn new(id: &str) -> NodeBuilder {
        NodeBuilder {
            id: id.to_owned(),
            client_addr: loopback(free_tcp_port()),
            admin_addr: loopback(free_tcp_port()),
            cluster_addr: loopback(free_udp_port()),
            gossip_addr: loopback(free_udp_port()),
            client_listen_flag: true,
            seeds: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            start_timeout: START_TIMEOUT,
        }
    }

    /// Adds command-line arguments after the harness's own.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Adds a seed (another node's gossip address).
    pub fn seed(mut self, gossip: SocketAddr) -> Self {
        self.seeds.push(gossip);
        self
    }

    /// Does not pass `--client-listen`; `expected` is where the test expects
    /// the client listener to end up (from the file or the environment).
    pub fn client_listen_elsewhere(mut self, expected: SocketAddr) -> Self {
        self.client_listen_flag = false;
        self.client_addr = expected;
        self
    }

    /// The full argument list given to `herald`.
    pub fn command_args(&self) -> Vec<String> {
        let mut args = vec!["--node-id".to_owned(), self.id.clone()];
        if self.client_listen_flag {
            args.push("--client-listen".to_owned());
            args.push(self.client_addr.to_string());
        }
        for (flag, addr) in [
            ("--admin-listen", self.admin_addr),
            ("--cluster-listen", self.cluster_addr),
            ("--gossip-listen", self.gossip_addr),
        ] {
            args.push(flag.to_owned());
            args.push(addr.to_string());
        }
        for seed in &self.seeds {
            args.push("--seed".to_owned());
            args.push(seed.to_string());
        }
        args.extend(self.args.iter().cloned());
        args
    }

    /// Spawns the node and waits until `/healthz` answers 200.
    pub async fn start(self) -> Result<Node> {
        let dir = scratch_dir(&self.id)?;
        let log_path = dir.join(format!("{}.log", self.id));
        let log = File::create(&log_path)?;
        let mut cmd = Command::new(herald_bin()?);
        cmd.args(self.command_args())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Settings from the test runner's own environment must not leak in.
        for (key, _) in std::env::vars() {
            if key.starts_with("HERALD_") {
                cmd.env_remove(key);
            }
        }
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill
        // the child when the thread that spawned it exits (a crashed or
        // killed test run then leaves no broker behind).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn herald for node {}", self.id))?;
        let mut node = Node {
            child,
            exit: None,
            config: self,
            dir,
            log_path,
        };
        node.wait_healthy().await?;
        Ok(node)
    }
}

/// A running `herald` process. Killed on drop.
pub struct Node {
    child: Child,
    exit: Option<ExitStatus>,
    pub config: NodeBuilder,
    dir: PathBuf,
    log_path: PathBuf,
}

impl Node {
    /// Starts a single node with these extra flags.
    pub async fn start(extra_args: &[&str]) -> Result<Node> {
        NodeBuilder::new("n1")
            .args(extra_args.iter().copied())
            .start()
            .await
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.config.client_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.config.admin_addr
    }

    pub fn gossip_addr(&self) -> SocketAddr {
        self.config.gossip_addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The node's combined stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    async fn wait_healthy(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.config.start_timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                bail!(
                    "herald exited with {status} before it was healthy; log:\n{}",
                    self.log()
                );
            }
            if let Ok(resp) = http::get(self.admin_addr(), "/healthz").await {
                if resp.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "herald did not answer /healthz with 200 within {:?}; log:\n{}",
                    self.config.start_timeout,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait()?;
        }
        Ok(self.exit)
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill has no memory-safety preconditions.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends SIGTERM (graceful drain).
    pub fn sigterm(&self) -> Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("herald did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.try_exit(), Ok(Some(_)))
    }

    /// A WebSocket connection to `/ws` with default options (json).
    pub async fn ws(&self) -> Result<WsClient> {
        WsConnect::new(self.client_addr()).connect().await
    }

    /// A msgpack WebSocket session.
    pub async fn ws_msgpack(&self) -> Result<WsClient> {
        WsConnect::new(self.client_addr())
            .subprotocol(crate::ws::MSGPACK)
            .connect()
            .await
    }

    /// A connection builder aimed at this node's client port.
    pub fn ws_connect(&self) -> WsConnect {
        WsConnect::new(self.client_addr())
    }

    /// `GET` on the admin port.
    pub async fn admin_get(&self, path: &str) -> Result<HttpResponse> {
        http::get(self.admin_addr(), path).await
    }

    /// Parsed `/metrics`.
    pub async fn metrics(&self) -> Result<Metrics> {
        let resp = self.admin_get("/metrics").await?;
        if resp.status != 200 {
            bail!("/metrics answered {}", resp.status);
        }
        Ok(Metrics::parse(&resp.text()))
    }

    /// Polls `/metrics` until `name` (summed over its labels) satisfies
    /// `check`, for at most `timeout`; returns the last value seen.
    pub async fn wait_metric(
        &self,
        name: &str,
        timeout: Duration,
        check: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metrics().await?.sum(name);
            if check(value) {
                return Ok(value);
            }
            if Instant::now() > deadline {
                bail!("metric {name} is {value} after {timeout:?}, not as expected");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Like [`Node::wait_metric`], for the samples of `name` whose label
    /// `label` is `value`.
    pub async fn wait_metric_labeled(
        &self,
        name: &str,
        (label, value): (&str, &str),
        timeout: Duration,
        check: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.metrics().await?.labeled(name, label, value);
            if check(seen) {
                return Ok(seen);
            }
            if Instant::now() > deadline {
                bail!("metric {name}{{{label}=\"{value}\"}} is {seen} after {timeout:?}, not as expected");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `POST /v1/publish/{topic_path}` with a content type (none if `None`).
    pub async fn http_publish(
        &self,
        topic_path: &str,
        content_type: Option<&str>,
        body: &[u8],
        extra_headers: &[(&str, &str)],
    ) -> Result<HttpResponse> {
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(ct) = content_type {
            headers.push(("Content-Type", ct));
        }
        headers.extend_from_slice(extra_headers);
        http::request(
            self.client_addr(),
            "POST",
            &format!("/v1/publish/{topic_path}"),
            &headers,
            body,
        )
        .await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "---- herald node {} log (last {} lines, full log kept at {}) ----",
                self.config.id,
                tail.len(),
                self.log_path.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            eprintln!("---- end of log ----");
        } else if std::env::var_os("HERALD_TEST_KEEP_LOGS").is_none() {
            // A test that returns an error (rather than panicking) leaves
            // nothing behind; set HERALD_TEST_KEEP_LOGS to keep the logs.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Several nodes joined through seeds: every node after the first seeds
/// from the first one's gossip address.
pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` nodes `n1..=n{n}`; `configure` may add flags to each.
    pub async fn start(
        n: usize,
        configure: impl Fn(NodeBuilder) -> NodeBuilder,
    ) -> Result<Cluster> {
        let builders: Vec<NodeBuilder> = (1..=n)
            .map(|i| configure(NodeBuilder::new(&format!("n{i}"))))
            .collect();
        let first_gossip = builders.first().map(|b| b.gossip_addr);
        let mut nodes = Vec::with_capacity(n);
        for (i, builder) in builders.into_iter().enumerate() {
            let builder = match first_gossip {
                Some(seed) if i > 0 => builder.seed(seed),
                _ => builder,
            };
            nodes.push(builder.start().await?);
        }
        Ok(Cluster { nodes })
    }
}
