//! Starting, watching and stopping real `herald` processes.
//!
//! A [`NodeBuilder`] describes one node (id, ports, extra flags, environment,
//! seeds); [`NodeBuilder::start`] spawns it and waits until its admin
//! `/healthz` answers 200. A [`Node`] kills its process when dropped, and
//! prints the tail of the node's log when the test is failing.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::certs::{Ca, NodeCert};
use crate::http::{self, HttpResponse};
use crate::metrics::Metrics;
use crate::ws::{WsClient, WsConnect};

/// How long a node may take to answer `/healthz` after it was spawned.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Cluster timings for tests on one machine: fast gossip, a short join
/// timeout, quick detection of a dead QUIC connection, and dead members
/// listed long enough for a test to see them as `dead`.
pub const TEST_CLUSTER_FLAGS: &[(&str, &str)] = &[
    ("--gossip-interval", "100ms"),
    ("--cluster-join-timeout", "2s"),
    ("--gossip-dead-grace", "30s"),
    ("--cluster-keep-alive", "500ms"),
    ("--cluster-idle-timeout", "3s"),
];

/// How long [`Cluster::start`] (and [`Cluster::wait_converged`]) wait for
/// every node to list every other on its ring and be ready.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);

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

    /// Sets `flag` to `value`: replaces the value of an earlier `flag` in
    /// [`NodeBuilder::args`] (herald refuses a flag given twice), else
    /// appends both.
    pub fn flag(mut self, flag: &str, value: &str) -> Self {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.to_owned(),
            _ => {
                self.args.push(flag.to_owned());
                self.args.push(value.to_owned());
            }
        }
        self
    }

    /// Cluster mutual TLS with this certificate (`--cluster-ca`,
    /// `--cluster-cert`, `--cluster-key`).
    pub fn cluster_tls(self, cert: &NodeCert) -> Self {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        self.flag("--cluster-ca", &path(&cert.ca))
            .flag("--cluster-cert", &path(&cert.cert))
            .flag("--cluster-key", &path(&cert.key))
    }

    /// Cluster mutual TLS with a certificate for this node's id from the
    /// test process's shared CA ([`Ca::shared`]).
    pub fn shared_cluster_tls(self) -> Result<Self> {
        let cert = Ca::shared()?.node(&self.id)?;
        Ok(self.cluster_tls(&cert))
    }

    /// The short, LAN-like cluster timings of [`TEST_CLUSTER_FLAGS`]; each
    /// can be overridden afterwards with [`NodeBuilder::flag`].
    pub fn cluster_timings(self) -> Self {
        TEST_CLUSTER_FLAGS
            .iter()
            .fold(self, |b, (flag, value)| b.flag(flag, value))
    }

    /// Spawns the process with its output going to a fresh log file.
    fn spawn(&self) -> Result<(Child, PathBuf, PathBuf)> {
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
        Ok((child, dir, log_path))
    }

    /// Spawns the node and waits until `/healthz` answers 200.
    pub async fn start(self) -> Result<Node> {
        let (child, dir, log_path) = self.spawn()?;
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

    /// Runs the node expecting it to exit by itself within `timeout` (a
    /// start it must refuse); returns its exit status and its output. A
    /// node still running then is killed and that is an error.
    pub async fn run_to_exit(self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let (child, dir, log_path) = self.spawn()?;
        let mut node = Node {
            child,
            exit: None,
            config: self,
            dir,
            log_path,
        };
        let status = node
            .wait_exit(timeout)
            .await
            .with_context(|| format!("log so far:\n{}", node.log()))?;
        Ok((status, node.log()))
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

    /// Stops the process (SIGSTOP) and waits until every one of its threads
    /// is stopped. `kill` returns before that: the stop starts only once the
    /// thread picked to take the signal runs, and on busy cores the others
    /// can go on for milliseconds meanwhile (seen as a "frozen" node still
    /// answering).
    pub async fn freeze(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)?;
        let tasks = format!("/proc/{}/task", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut running = Vec::new();
            for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
                let stat = task?.path().join("stat");
                // A thread that ended meanwhile has no stat any more.
                let Ok(text) = std::fs::read_to_string(&stat) else {
                    continue;
                };
                // The state follows the command name, which is in parentheses.
                let state = text
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next());
                if !matches!(state, Some("T" | "t")) {
                    running.push(format!("{}: {state:?}", stat.display()));
                }
            }
            if running.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{} not stopped 5 s after SIGSTOP: {running:?}", self.id());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
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

impl Node {
    /// Whether the harness has seen the process exit (after
    /// [`Node::kill9`], [`Node::wait_exit`] or [`Node::has_exited`]).
    pub fn exited(&self) -> bool {
        self.exit.is_some()
    }

    /// SIGKILL, then waits (bounded) until the process is gone.
    pub async fn kill9(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_exit()? {
            return Ok(status);
        }
        self.signal(libc::SIGKILL)?;
        self.wait_exit(Duration::from_secs(5)).await
    }

    /// `/v1/cluster`, parsed.
    pub async fn cluster_view(&self) -> Result<Value> {
        let resp = self.admin_get("/v1/cluster").await?;
        if resp.status != 200 {
            bail!("/v1/cluster answered {}: {}", resp.status, resp.text());
        }
        resp.json()
    }

    /// `/readyz`: its status and body.
    pub async fn readyz(&self) -> Result<(u16, Value)> {
        let resp = self.admin_get("/readyz").await?;
        Ok((resp.status, resp.json()?))
    }

    /// The ids that own a share of the ring, as `/v1/cluster` shows them.
    pub async fn ring_owners(&self) -> Result<BTreeSet<String>> {
        Ok(ring_owners(&self.cluster_view().await?))
    }

    /// The state `/v1/cluster` shows for member `id`; `None` when it is
    /// not listed.
    pub async fn member_state(&self, id: &str) -> Result<Option<String>> {
        Ok(member_state(&self.cluster_view().await?, id))
    }

    /// Polls `/v1/cluster` until `check` holds, for at most `timeout`;
    /// returns the view that satisfied it. `what` names the condition in
    /// the error, which shows the last view.
    pub async fn wait_cluster_view(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.cluster_view().await;
            if let Ok(view) = &last {
                if check(view) {
                    return Ok(view.clone());
                }
            }
            if !self.is_running() {
                bail!(
                    "node {}: {what}: the process is gone\n{}",
                    self.id(),
                    self.describe()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "node {}: {what}: not within {timeout:?}; last /v1/cluster: {}\n{}",
                    self.id(),
                    match last {
                        Ok(view) => view.to_string(),
                        Err(e) => format!("{e:#}"),
                    },
                    self.describe()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Checks that the process answering on this node's admin port is this
    /// node: `/v1/cluster` names its id, with this node's client address.
    /// (Free ports are picked per test process; another process on the
    /// machine may take one in between.)
    pub async fn check_identity(&self) -> Result<()> {
        let view = self.cluster_view().await?;
        let me = view["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["node_id"] == self.id()));
        let client = me.and_then(|m| m["client_addr"].as_str());
        if view["node_id"] != self.id() || client != Some(&self.client_addr().to_string()) {
            bail!(
                "the admin port of node {} ({}) is answered by another process: {view}\n{}",
                self.id(),
                self.admin_addr(),
                self.describe()
            );
        }
        Ok(())
    }

    /// Whether the process is still running (not exited, not a zombie),
    /// without reaping it (`/proc/PID/stat`).
    pub fn is_running(&self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()));
        // The state follows the command name in parentheses.
        stat.ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next())
            })
            .is_some_and(|state| state != 'Z' && state != 'X')
    }

    /// For error messages: whether the process still runs, and the tail of
    /// its log (a failing test that returns an error does not keep logs).
    pub fn describe(&self) -> String {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "node {} (pid {}) {}; last log lines:\n{}",
            self.id(),
            self.pid(),
            if self.is_running() {
                "is running"
            } else {
                "has exited"
            },
            tail.join("\n")
        )
    }
}

/// The ids with a share of the ring in a `/v1/cluster` answer.
pub fn ring_owners(view: &Value) -> BTreeSet<String> {
    view["ring"]["owners"]
        .as_object()
        .map(|owners| owners.keys().cloned().collect())
        .unwrap_or_default()
}

/// The state of member `id` in a `/v1/cluster` answer.
pub fn member_state(view: &Value, id: &str) -> Option<String> {
    view["members"]
        .as_array()?
        .iter()
        .find(|m| m["node_id"] == id)
        .and_then(|m| m["state"].as_str())
        .map(str::to_owned)
}

/// The generation of member `id` in a `/v1/cluster` answer.
pub fn member_generation(view: &Value, id: &str) -> Option<u64> {
    view["members"]
        .as_array()?
        .iter()
        .find(|m| m["node_id"] == id)
        .and_then(|m| m["generation"].as_u64())
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

/// Several nodes joined through seeds into one cluster over mutual TLS
/// (certificates from [`Ca::shared`]), with [`TEST_CLUSTER_FLAGS`]: every
/// node after the first seeds from the first one's gossip address.
///
/// `nodes[i]` is node `n{i+1}`; a node killed with [`Cluster::kill9`] stays
/// in place (exited) until [`Cluster::restart`] replaces it, so indices
/// never shift. Every process is killed when the cluster is dropped.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// Earlier lives of restarted nodes: kept (exited) so that their logs
    /// are still there (and printed) if the test fails.
    retired: Vec<Node>,
}

impl Cluster {
    /// Starts `n` nodes `n1..=n{n}` and waits (up to [`CONVERGE_TIMEOUT`])
    /// until every node's ring lists all of them and every node is ready.
    /// `configure` may add or override flags of each (use
    /// [`NodeBuilder::flag`] to change one of the harness's own).
    pub async fn start(
        n: usize,
        configure: impl Fn(NodeBuilder) -> NodeBuilder,
    ) -> Result<Cluster> {
        let mut cluster = Cluster {
            nodes: Vec::with_capacity(n),
            retired: Vec::new(),
        };
        for _ in 0..n {
            cluster.add_node_unconverged(&configure).await?;
        }
        cluster.wait_converged(CONVERGE_TIMEOUT).await?;
        Ok(cluster)
    }

    /// The builder of the next node: `n{len+1}`, fresh ports, TLS and
    /// timings, seeded with the first live node's gossip address.
    pub fn next_builder(&self) -> Result<NodeBuilder> {
        let id = format!("n{}", self.nodes.len() + 1);
        let mut builder = NodeBuilder::new(&id)
            .shared_cluster_tls()?
            .cluster_timings();
        if let Some(seed) = self.live().next() {
            builder = builder.seed(seed.gossip_addr());
        }
        Ok(builder)
    }

    async fn add_node_unconverged(
        &mut self,
        configure: &impl Fn(NodeBuilder) -> NodeBuilder,
    ) -> Result<usize> {
        let builder = configure(self.next_builder()?);
        let node = builder.start().await?;
        node.check_identity().await?;
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    /// Starts one more node (see [`Cluster::next_builder`]) and returns its
    /// index once it is healthy; [`Cluster::wait_converged`] waits for it
    /// to be on every ring.
    pub async fn add_node(
        &mut self,
        configure: impl Fn(NodeBuilder) -> NodeBuilder,
    ) -> Result<usize> {
        self.add_node_unconverged(&configure).await
    }

    /// The nodes still running (as far as the harness knows).
    pub fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| !n.exited())
    }

    /// Ids of the nodes still running.
    pub fn live_ids(&self) -> BTreeSet<String> {
        self.live().map(|n| n.id().to_owned()).collect()
    }

    /// Waits until every live node's ring owners are exactly the live
    /// nodes and every live node's `/readyz` is 200.
    pub async fn wait_converged(&self, timeout: Duration) -> Result<()> {
        let want = self.live_ids();
        let deadline = Instant::now() + timeout;
        for node in self.live() {
            let left = deadline.saturating_duration_since(Instant::now());
            node.wait_cluster_view(&format!("ring owners {want:?}"), left, |v| {
                ring_owners(v) == want
            })
            .await?;
            loop {
                let (status, body) = node.readyz().await?;
                if status == 200 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "node {}: /readyz still {status} {body} after {timeout:?}\n{}",
                        node.id(),
                        node.describe()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Rings may have moved while later nodes were looked at: check once
        // more that every view is still the converged one.
        for node in self.live() {
            let owners = node.ring_owners().await?;
            if owners != want {
                let left = deadline.saturating_duration_since(Instant::now());
                node.wait_cluster_view(&format!("ring owners {want:?}"), left, |v| {
                    ring_owners(v) == want
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Waits until the ring of each node in `at` (indices) is exactly
    /// `owners`.
    pub async fn wait_ring(&self, at: &[usize], owners: &[&str], timeout: Duration) -> Result<()> {
        let want: BTreeSet<String> = owners.iter().map(|s| (*s).to_owned()).collect();
        let deadline = Instant::now() + timeout;
        for &i in at {
            let left = deadline.saturating_duration_since(Instant::now());
            self.nodes[i]
                .wait_cluster_view(&format!("ring owners {want:?}"), left, |v| {
                    ring_owners(v) == want
                })
                .await?;
        }
        Ok(())
    }

    /// SIGKILLs node `i` and waits until its process is gone. The node
    /// stays at its index (exited) until [`Cluster::restart`].
    pub async fn kill9(&mut self, i: usize) -> Result<ExitStatus> {
        self.nodes[i].kill9().await
    }

    /// Starts node `i` again with the same id, ports, certificate and flags
    /// (killing it first if it still runs); a node that had no seeds (the
    /// first) is seeded with the live nodes' gossip addresses, so that it
    /// rejoins rather than starts a cluster of its own. Returns once it is
    /// healthy; [`Cluster::wait_converged`] waits for it to be placed.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.nodes[i].kill9().await?;
        let mut builder = self.nodes[i].config.clone();
        if builder.seeds.is_empty() {
            builder.seeds = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(j, n)| *j != i && !n.exited())
                .map(|(_, n)| n.gossip_addr())
                .collect();
        }
        let node = builder.start().await?;
        node.check_identity().await?;
        let old = std::mem::replace(&mut self.nodes[i], node);
        self.retired.push(old);
        Ok(())
    }
}
