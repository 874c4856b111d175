//! The idle scenario: many quiet subscribed connections, and the broker's
//! memory per connection.
//!
//! Connections are spread over child processes (the file limit is per
//! process). The broker's resident set (`VmRSS` in `/proc/PID/status`) is
//! read before any connection opens, once all are subscribed, and again after
//! a settle period during which connections only read (tungstenite answers
//! the server's pings; NATS `PING`s get a `PONG`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::session::{
    AnySubscriber, Codec, FrameOutcome, ParseMode, SubscriberConn, SubscriberSettings, Target,
};
use crate::worker::{shares, ParentLink, Worker, WorkerSpec};
use crate::ws::{self, BufferProfile};

/// Whether idle connections share one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicMode {
    /// Every connection subscribes to the same topic.
    Shared,
    /// Every connection has its own topic.
    Distinct,
}

/// Options of `herald-bench idle`.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Broker protocol.
    #[arg(long, value_enum, default_value = "herald")]
    pub target: Target,
    /// WebSocket URL (repeatable; connections are spread round robin).
    #[arg(long)]
    pub url: Vec<String>,
    /// Herald codec.
    #[arg(long, value_enum, default_value = "json")]
    pub codec: Codec,
    /// Connections to open.
    #[arg(short = 'c', long, default_value_t = 19_000)]
    pub connections: usize,
    /// Child processes holding them (0: one per 10,000 connections, at least 2).
    #[arg(long, default_value_t = 0)]
    pub procs: usize,
    /// Tokio worker threads per child process.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// One topic for all, or one each.
    #[arg(long, value_enum, default_value = "distinct")]
    pub topics: TopicMode,
    /// The broker's pid (default: the only process named `herald` / `nats-server`).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Process name to look for instead of the target's.
    #[arg(long)]
    pub process_name: Option<String>,
    /// How long to keep the connections quiet before measuring again.
    #[arg(long, default_value_t = 30.0)]
    pub settle_secs: f64,
    /// Concurrent handshakes per child process.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Attempts per connection (a refused one, e.g. 1013, is retried with backoff).
    #[arg(long, default_value_t = 5)]
    pub attempts: u32,
    /// Give up on the whole run after this many seconds.
    #[arg(long, default_value_t = 900.0)]
    pub timeout_secs: f64,
    /// Also print the summary as one `JSON {...}` line.
    #[arg(long)]
    pub json: bool,
}

/// What one idle child does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleGroupSpec {
    pub settings: SubscriberSettings,
    pub urls: Vec<String>,
    pub topics: TopicMode,
    pub topic_prefix: String,
    pub offset: usize,
    pub count: usize,
    pub connect_concurrency: usize,
    pub attempts: u32,
    pub deadline_secs: f64,
}

/// `READY` from an idle child.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdleReady {
    pub opened: usize,
    pub failed: usize,
    pub retries: usize,
    pub first_error: Option<String>,
}

/// `ALIVE` / `RESULT` from an idle child.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdleAlive {
    pub alive: usize,
    pub close_codes: BTreeMap<String, u64>,
}

/// The broker's memory figures.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rss {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// Reads `VmRSS` and `VmHWM` of `pid`.
pub fn read_rss(pid: u32) -> Result<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad line {line:?}"))
    };
    Ok(Rss {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// The pid of the only process whose name is `name`.
pub fn find_pid(name: &str) -> Result<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            if comm.trim_end() == name {
                found.push(pid);
            }
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => bail!("no process named {name}; give --pid"),
        many => bail!("several processes named {name} ({many:?}); give --pid"),
    }
}

/// Figures of one idle run.
#[derive(Debug, Clone, Serialize)]
pub struct IdleSummary {
    pub target: Target,
    pub pid: u32,
    pub connections: usize,
    pub opened: usize,
    pub failed: usize,
    pub connect_secs: f64,
    pub before: Rss,
    pub after_connect: Rss,
    pub bytes_per_conn_after_connect: f64,
    pub alive_after_settle: usize,
    pub after_settle: Rss,
    pub bytes_per_conn_after_settle: f64,
    pub close_codes: BTreeMap<String, u64>,
}

/// Runs the idle scenario and prints its figures.
pub async fn run(args: IdleArgs) -> Result<IdleSummary> {
    if args.connections == 0 {
        bail!("need at least one connection");
    }
    let urls = if args.url.is_empty() {
        vec![args.target.default_url().to_string()]
    } else {
        args.url.clone()
    };
    let name = args
        .process_name
        .clone()
        .unwrap_or_else(|| args.target.process_name().to_string());
    let pid = match args.pid {
        Some(pid) => pid,
        None => find_pid(&name)?,
    };
    let procs = if args.procs == 0 {
        args.connections.div_ceil(10_000).max(2)
    } else {
        args.procs
    }
    .min(args.connections);
    if args.connections.div_ceil(procs) > 19_500 {
        bail!("more than 19,500 connections per process would hit the file limit; raise --procs");
    }
    let timeout = Duration::from_secs_f64(args.timeout_secs);
    let topic_prefix = format!("bench.idle.{}", std::process::id());

    let before = read_rss(pid)?;
    println!(
        "== idle target={:?} connections={} procs={procs} topics={:?} broker pid {pid}",
        args.target, args.connections, args.topics
    );
    println!("before:          RSS {}", fmt_kib(before.rss_kib));

    let started = Instant::now();
    let mut workers = Vec::with_capacity(procs);
    for (i, (offset, count)) in shares(args.connections, procs).into_iter().enumerate() {
        let spec = WorkerSpec::Idle(IdleGroupSpec {
            settings: SubscriberSettings {
                target: args.target,
                codec: args.codec,
                parse: ParseMode::Full,
            },
            urls: urls.clone(),
            topics: args.topics,
            topic_prefix: topic_prefix.clone(),
            offset,
            count,
            connect_concurrency: args.connect_concurrency,
            attempts: args.attempts.max(1),
            deadline_secs: args.timeout_secs,
        });
        workers.push(Worker::spawn(format!("idle-{i}"), &spec, args.threads)?);
    }
    let mut ready = IdleReady::default();
    for worker in &mut workers {
        let r: IdleReady = worker.expect("READY", timeout).await?;
        ready.opened += r.opened;
        ready.failed += r.failed;
        ready.retries += r.retries;
        if ready.first_error.is_none() {
            ready.first_error = r.first_error;
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    // Let the broker finish whatever the last handshakes started.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_connect = read_rss(pid)?;
    let per_conn = |rss: Rss| {
        (rss.rss_kib as f64 - before.rss_kib as f64) * 1024.0 / ready.opened.max(1) as f64
    };
    println!(
        "subscribed:      {} open, {} failed, {} retries in {connect_secs:.1} s{}",
        ready.opened,
        ready.failed,
        ready.retries,
        ready
            .first_error
            .as_deref()
            .map(|e| format!(" (first error: {e})"))
            .unwrap_or_default()
    );
    println!(
        "after subscribe: RSS {} (peak {}), {:.0} B = {:.2} KiB per connection",
        fmt_kib(after_connect.rss_kib),
        fmt_kib(after_connect.hwm_kib),
        per_conn(after_connect),
        per_conn(after_connect) / 1024.0
    );

    let settle_end = Instant::now() + Duration::from_secs_f64(args.settle_secs);
    while Instant::now() < settle_end {
        let step = (settle_end - Instant::now()).min(Duration::from_secs(10));
        tokio::time::sleep(step).await;
        if Instant::now() < settle_end {
            let rss = read_rss(pid)?;
            eprintln!("  settling: RSS {}", fmt_kib(rss.rss_kib));
        }
    }
    let after_settle = read_rss(pid)?;
    let mut alive = IdleAlive::default();
    for worker in &mut workers {
        worker.send("CHECK", &()).await?;
        let a: IdleAlive = worker.expect("ALIVE", timeout).await?;
        alive.alive += a.alive;
        for (code, n) in a.close_codes {
            *alive.close_codes.entry(code).or_default() += n;
        }
    }
    println!(
        "after {:.0} s:      RSS {} (peak {}), {} alive {:?}, {:.0} B = {:.2} KiB per connection",
        args.settle_secs,
        fmt_kib(after_settle.rss_kib),
        fmt_kib(after_settle.hwm_kib),
        alive.alive,
        alive.close_codes,
        per_conn(after_settle),
        per_conn(after_settle) / 1024.0
    );

    for worker in &mut workers {
        worker.send("EXIT", &()).await?;
    }
    for mut worker in workers {
        let _: IdleAlive = worker.expect("RESULT", Duration::from_secs(60)).await?;
        let name = worker.name().to_string();
        if let Err(e) = worker.finish(Duration::from_secs(30)).await {
            eprintln!("{name}: {e:#}");
        }
    }
    let summary = IdleSummary {
        target: args.target,
        pid,
        connections: args.connections,
        opened: ready.opened,
        failed: ready.failed,
        connect_secs,
        before,
        after_connect,
        bytes_per_conn_after_connect: per_conn(after_connect),
        alive_after_settle: alive.alive,
        after_settle,
        bytes_per_conn_after_settle: per_conn(after_settle),
        close_codes: alive.close_codes,
    };
    if args.json {
        println!("JSON {}", serde_json::to_string(&summary)?);
    }
    Ok(summary)
}

fn fmt_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[derive(Default)]
struct Liveness {
    alive: AtomicUsize,
    close_codes: Mutex<BTreeMap<String, u64>>,
}

impl Liveness {
    fn snapshot(&self) -> IdleAlive {
        IdleAlive {
            alive: self.alive.load(Ordering::Relaxed),
            close_codes: self
                .close_codes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    fn ended(&self, code: String) {
        self.alive.fetch_sub(1, Ordering::Relaxed);
        *self
            .close_codes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(code)
            .or_default() += 1;
    }
}

/// Runs an idle child, talking to the parent through `link`.
pub async fn run_group(spec: IdleGroupSpec, link: &mut ParentLink) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(spec.deadline_secs);
    let liveness = Arc::new(Liveness::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::channel::<(Result<(), String>, usize)>(spec.count.max(1));
    let connect_limit = Arc::new(Semaphore::new(spec.connect_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(spec.count);
    for n in 0..spec.count {
        let global = spec.offset + n;
        let topic = match spec.topics {
            TopicMode::Shared => format!("{}.shared", spec.topic_prefix),
            TopicMode::Distinct => format!("{}.{global}", spec.topic_prefix),
        };
        tasks.push(tokio::spawn(idle_connection(
            spec.settings.clone(),
            ws::url_for(&spec.urls, global).to_string(),
            topic,
            spec.attempts,
            connect_limit.clone(),
            ready_tx.clone(),
            stop_rx.clone(),
            liveness.clone(),
        )));
    }
    drop(ready_tx);

    let mut ready = IdleReady::default();
    while ready.opened + ready.failed < spec.count {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some((Ok(()), retries))) => {
                ready.opened += 1;
                ready.retries += retries;
            }
            Ok(Some((Err(e), retries))) => {
                ready.failed += 1;
                ready.retries += retries;
                ready.first_error.get_or_insert(e);
            }
            Ok(None) | Err(_) => break,
        }
    }
    link.report("READY", &ready)?;

    loop {
        match tokio::time::timeout_at(deadline, link.command()).await {
            Ok(Ok(Some((tag, _)))) if tag == "CHECK" => {
                link.report("ALIVE", &liveness.snapshot())?;
            }
            Ok(Ok(Some((tag, _)))) if tag == "EXIT" => break,
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
        }
    }
    let snapshot = liveness.snapshot();
    let _ = stop_tx.send(true);
    let closing = async {
        for task in tasks {
            let _ = task.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), closing).await;
    link.report("RESULT", &snapshot)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn idle_connection(
    settings: SubscriberSettings,
    url: String,
    topic: String,
    attempts: u32,
    connect_limit: Arc<Semaphore>,
    ready_tx: mpsc::Sender<(Result<(), String>, usize)>,
    mut stop_rx: watch::Receiver<bool>,
    liveness: Arc<Liveness>,
) {
    let mut retries = 0;
    let opened = loop {
        let attempt = {
            let Ok(_permit) = connect_limit.acquire().await else {
                return;
            };
            AnySubscriber::open(&settings, &url, &topic, BufferProfile::Idle).await
        };
        match attempt {
            Ok(conn) => break Ok(conn),
            Err(e) if retries + 1 >= attempts as usize => break Err(format!("{e:#}")),
            Err(_) => {
                let backoff = Duration::from_millis(200 << retries.min(4));
                retries += 1;
                tokio::time::sleep(backoff).await;
            }
        }
    };
    let mut conn = match opened {
        Ok(conn) => {
            liveness.alive.fetch_add(1, Ordering::Relaxed);
            let _ = ready_tx.send((Ok(()), retries)).await;
            conn
        }
        Err(e) => {
            let _ = ready_tx.send((Err(e), retries)).await;
            return;
        }
    };
    drop(ready_tx);
    let mut ignored = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = stop_rx.changed() => {
                conn.close().await;
                return;
            }
            outcome = conn.next_frame(&mut ignored) => {
                ignored.clear();
                match outcome {
                    Ok(FrameOutcome::Data { .. }) => {}
                    Ok(FrameOutcome::Closed { code }) => {
                        liveness.ended(code.map_or_else(|| "none".into(), |c| c.to_string()));
                        return;
                    }
                    Err(e) => {
                        liveness.ended(format!("error: {e:#}"));
                        return;
                    }
                }
            }
        }
    }
}
