//! The chaos harness: a three-node Herald cluster in Docker containers on a
//! network of its own, behind HAProxy; a workload of acking publishers and
//! resuming subscribers through HAProxy; faults (kill -9, pause, network
//! cut, rolling restart) from a seeded plan while it runs; then a checker
//! over everything the clients saw, and a report. See docs/chaos.md.
//!
//! This module is compiled into the `chaos` binary (`src/bin/chaos.rs`)
//! and into the `chaos` test (`tests/chaos.rs`) with `#[path]`; it uses the
//! library's WebSocket and HTTP clients. The `compose` test
//! (`tests/compose.rs`) takes only `images` and `docker` the same way.

pub mod checker;
mod cluster;
mod docker;
pub mod faults;
pub mod images;
pub mod workload;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use checker::{secs, Check, Violation};
use cluster::DockerCluster;
pub use docker::docker_available;
use docker::{Events, Guard};
pub use faults::FaultKind;
use faults::FaultRecord;
pub use images::BuildPolicy;
use workload::{Shape, Workload};

/// Everything a run is made of.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    /// Time budget of the fault phase: no fault starts after it (but every
    /// kind in `faults` runs once, however long that takes).
    pub duration: Duration,
    pub faults: Vec<FaultKind>,
    pub publishers: usize,
    pub subscribers: usize,
    /// Subscribers that also leave and come back on their own.
    pub flappers: usize,
    pub topics: usize,
    pub publish_interval: Duration,
    /// Bound on membership convergence after each heal (and on detection
    /// of a node that is away, when the fault is held that long).
    pub converge_bound: Duration,
    /// `--cluster-request-timeout` of the nodes.
    pub request_timeout: Duration,
    /// Slack on the request timeout for a reply to `pub` (a loaded machine).
    pub reply_slack: Duration,
    pub herald_image: String,
    pub haproxy_image: String,
    pub build: BuildPolicy,
    /// Where node logs, events and the report are written.
    pub artifacts: PathBuf,
}

impl Config {
    /// The defaults, for `seed` and a fault phase of `duration`.
    pub fn new(seed: u64, duration: Duration) -> Config {
        Config {
            seed,
            duration,
            faults: FaultKind::ALL.to_vec(),
            publishers: 3,
            subscribers: 3,
            flappers: 1,
            topics: 12,
            publish_interval: Duration::from_millis(30),
            converge_bound: Duration::from_secs(15),
            request_timeout: Duration::from_secs(2),
            reply_slack: Duration::from_secs(2),
            herald_image: images::HERALD_IMAGE.to_owned(),
            haproxy_image: images::HAPROXY_IMAGE.to_owned(),
            build: BuildPolicy::IfStale,
            artifacts: images::repo_root().join("target/chaos"),
        }
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub run: String,
    pub violations: Vec<Violation>,
    /// Docker commands of the faults that failed: the run did not do what
    /// it meant to, so it proves nothing either way.
    pub harness_errors: Vec<String>,
    /// The report, as printed.
    pub report: String,
    /// The run's directory of logs and the report.
    pub artifacts: PathBuf,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.harness_errors.is_empty()
    }
}

/// Warm-up with the workload before the first fault.
const WARMUP: Duration = Duration::from_secs(3);
/// Workload after the last heal, before publishers stop.
const SETTLE: Duration = Duration::from_secs(6);
/// Subscribers go on this long after publishers stop.
const DRAIN: Duration = Duration::from_secs(3);

/// Runs the harness once. `Err` is a failure of the harness itself (Docker,
/// images); what Herald did wrong is in [`Outcome::violations`].
pub async fn run(config: Config) -> Result<Outcome> {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "herald-chaos-{}-{}-s{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed),
        config.seed
    );
    let dir = config.artifacts.join(&name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut notes = Vec::new();
    match docker::remove_stale() {
        Ok(removed) if !removed.is_empty() => notes.push(format!(
            "removed leftovers of earlier runs: {}",
            removed.join(", ")
        )),
        Ok(_) => {}
        Err(e) => notes.push(format!("could not look for leftovers: {e:#}")),
    }
    let build_started = Instant::now();
    let (mut run_images, built) = images::ensure(
        &config.herald_image,
        &[&config.haproxy_image],
        config.build,
        &config.artifacts,
    )
    .await?;
    notes.extend(built);
    let build_time = build_started.elapsed();
    let config = Config {
        herald_image: run_images.swap_remove(0),
        ..config
    };
    // Every time in the report is since here.
    let origin = Instant::now();

    // The whole run is bounded: setup, the fault phase (the first round of
    // faults may overrun the budget), the final phase.
    let per_fault = Duration::from_secs(120);
    let limit = Duration::from_secs(180) + config.duration + per_fault * config.faults.len() as u32;
    let guard = Arc::new(Guard::default());
    let result =
        tokio::time::timeout(limit, run_cluster(&config, &name, &dir, &guard, origin)).await;
    guard.cleanup();
    let (violations, harness_errors, body) = match result {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("the run did not finish within {limit:?}"),
    };

    let mut report = String::new();
    let _ = writeln!(
        report,
        "Herald chaos run {name}: seed {}, {} in all{}",
        config.seed,
        secs(origin.elapsed()),
        if build_time > Duration::from_secs(5) {
            format!(" (plus {} building images)", secs(build_time))
        } else {
            String::new()
        }
    );
    for note in &notes {
        let _ = writeln!(report, "note: {note}");
    }
    report.push_str(&body);
    let _ = writeln!(
        report,
        "\nResult: {} ({} violation(s){}); logs in {}",
        if !harness_errors.is_empty() {
            "HARNESS ERROR"
        } else if violations.is_empty() {
            "PASS"
        } else {
            "FAIL"
        },
        violations.len(),
        if harness_errors.is_empty() {
            String::new()
        } else {
            format!(", {} harness error(s)", harness_errors.len())
        },
        dir.display()
    );
    std::fs::write(dir.join("report.txt"), &report)?;
    let all: Vec<String> = violations
        .iter()
        .map(|v| format!("[{}] {}", v.check.name(), v.detail))
        .collect();
    std::fs::write(dir.join("violations.txt"), all.join("\n"))?;
    Ok(Outcome {
        run: name,
        violations,
        harness_errors,
        report,
        artifacts: dir,
    })
}

/// Starts the cluster, runs the workload and the faults, collects and
/// checks. Returns the violations, the harness's own errors and the body of
/// the report.
async fn run_cluster(
    config: &Config,
    name: &str,
    dir: &std::path::Path,
    guard: &Arc<Guard>,
    origin: Instant,
) -> Result<(Vec<Violation>, Vec<String>, String)> {
    let mut out = String::new();
    let mut harness_errors = Vec::new();
    let mut violations = Vec::new();
    let events = Events::watch(name, origin).await?;
    let cluster = DockerCluster::start(
        name,
        &config.herald_image,
        &config.haproxy_image,
        config.request_timeout,
        guard,
    )
    .await?;
    if let Err(why) = cluster.wait_ready(Duration::from_secs(20)).await {
        let _ = writeln!(out, "note: starting the workload anyway: {why}");
    }
    let ready_at = origin.elapsed();
    let _ = writeln!(
        out,
        "cluster: {} ({}) behind HAProxy at {}, network {}; formed at {}",
        cluster
            .nodes
            .iter()
            .map(|n| format!("{} {}", n.id, n.ip))
            .collect::<Vec<_>>()
            .join(", "),
        config.herald_image,
        cluster.lb_addr,
        cluster.network,
        secs(ready_at)
    );

    let topics: Vec<String> = (0..config.topics).map(|i| format!("chaos.t{i}")).collect();
    let shape = Shape {
        publishers: config.publishers,
        subscribers: config.subscribers,
        flappers: config.flappers,
        topics: topics.clone(),
        publish_interval: config.publish_interval,
    };
    let mut workload = Workload::start(cluster.lb_addr, &shape, config.seed, origin);
    tokio::time::sleep(WARMUP).await;

    // ---- faults ----
    let plan = faults::plan(config.seed, &config.faults, cluster.nodes.len(), 1000);
    let chaos_started = Instant::now();
    let mut records: Vec<FaultRecord> = Vec::new();
    let mut expected_exits = Vec::new();
    for (i, fault) in plan.iter().enumerate() {
        if i >= config.faults.len() && chaos_started.elapsed() >= config.duration {
            break;
        }
        eprintln!(
            "chaos: {} fault {}: {} on {}",
            secs(origin.elapsed()),
            i + 1,
            fault.kind,
            fault
                .targets
                .iter()
                .map(|&t| cluster.nodes[t].id.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        let (recs, exits) = faults::execute(&cluster, fault, config.converge_bound, origin).await;
        records.extend(recs);
        expected_exits.extend(exits);
    }
    let all: Vec<usize> = (0..cluster.nodes.len()).collect();
    let final_converge = cluster.wait_converged(&all, config.converge_bound).await;
    let quiet_from = origin.elapsed();

    // ---- the end: settle, stop publishers, drain, stop subscribers ----
    tokio::time::sleep(SETTLE).await;
    let publishers = workload.stop_publishers().await;
    tokio::time::sleep(DRAIN).await;
    let subscribers = workload.stop_subscribers().await;
    let ended_at = origin.elapsed();

    // ---- faults, membership ----
    let _ = writeln!(out, "\nfaults ({}):", records.len());
    for r in &records {
        let _ = writeln!(
            out,
            "  {:>7} {:<15} {}: {}{}{}",
            secs(r.injected),
            r.kind.name(),
            r.node,
            match r.healed {
                Some(h) => format!("healed at {}", secs(h)),
                None => "never healed".to_owned(),
            },
            match (r.kind, r.detected) {
                (FaultKind::RollingRestart, _) => String::new(),
                (_, Some(d)) => format!(", others dropped it in {}", secs(d)),
                (_, None) => ", others still placed it when it was healed".to_owned(),
            },
            match &r.converged {
                Some(Ok(d)) => format!(", converged {} after", secs(*d)),
                Some(Err(_)) => ", NOT converged".to_owned(),
                None => String::new(),
            }
        );
        for e in &r.errors {
            let _ = writeln!(out, "      HARNESS ERROR: {e}");
            harness_errors.push(format!("{} of {}: {e}", r.kind, r.node));
        }
        if let Some(Err(last)) = &r.converged {
            violations.push(Violation::new(
                Check::Membership,
                format!(
                    "after {} of {} healed at {}: not converged within {}: {last}",
                    r.kind,
                    r.node,
                    secs(r.healed.unwrap_or_default()),
                    secs(config.converge_bound)
                ),
            ));
        }
    }
    if let Err(last) = &final_converge {
        violations.push(Violation::new(
            Check::Membership,
            format!(
                "at the end: not converged within {}: {last}",
                secs(config.converge_bound)
            ),
        ));
    }

    // ---- crashes ----
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = events.snapshot();
    let mut expected = expected_exits.clone();
    for e in seen.iter().filter(|e| e.at <= ended_at) {
        match e.action.as_str() {
            "die" => {
                let code = e.exit_code.unwrap_or(-1);
                match expected.iter().position(|(c, _)| *c == e.container) {
                    Some(pos) => {
                        let (_, want) = expected.remove(pos);
                        if want != code {
                            violations.push(Violation::new(
                                Check::Crash,
                                format!(
                                    "{} exited with code {code} at {} where {want} was expected{}",
                                    e.container,
                                    secs(e.at),
                                    if want == 0 {
                                        " (a drain after SIGTERM should end cleanly and within the stop timeout)"
                                    } else {
                                        ""
                                    }
                                ),
                            ));
                        }
                    }
                    None => violations.push(Violation::new(
                        Check::Crash,
                        format!(
                            "{} exited unexpectedly with code {code} at {}",
                            e.container,
                            secs(e.at)
                        ),
                    )),
                }
            }
            "oom" => violations.push(Violation::new(
                Check::Crash,
                format!("{} was OOM-killed at {}", e.container, secs(e.at)),
            )),
            _ => {}
        }
    }
    for (container, code) in &expected {
        violations.push(Violation::new(
            Check::Crash,
            format!(
                "{container}: the exit (code {code}) a fault caused was not seen in docker events"
            ),
        ));
    }
    for container in cluster.containers() {
        match cluster.state(&container).await {
            Ok(state) => {
                if state["Running"] != true || state["OOMKilled"] == true || state["Paused"] == true
                {
                    violations.push(Violation::new(
                        Check::Crash,
                        format!("{container} at the end: state {state}"),
                    ));
                }
            }
            Err(e) => violations.push(Violation::new(Check::Crash, format!("{container}: {e:#}"))),
        }
        let log = dir.join(format!(
            "{}.log",
            container.trim_start_matches(&format!("{name}-"))
        ));
        if let Err(e) = cluster.save_logs(&container, &log) {
            eprintln!("chaos: {e:#}");
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("panicked")) {
            violations.push(Violation::new(
                Check::Crash,
                format!("{container} log has a panic: {line}"),
            ));
        }
    }
    let mut event_lines = String::new();
    for e in &seen {
        let _ = writeln!(
            event_lines,
            "{} {} {} {}",
            secs(e.at),
            e.container,
            e.action,
            e.exit_code.map(|c| c.to_string()).unwrap_or_default()
        );
    }
    std::fs::write(dir.join("docker-events.txt"), event_lines)?;

    // ---- the workload's view ----
    let stall_windows: Vec<_> = records
        .iter()
        .filter_map(FaultRecord::stall_window)
        .collect();
    let ctx = checker::Context {
        stall_windows,
        reply_bound: config.request_timeout + config.reply_slack,
    };
    let (found, stats) = checker::check(&publishers, &subscribers, &ctx);
    violations.extend(found);
    violations.extend(checker::liveness(
        &publishers,
        &subscribers,
        &topics,
        quiet_from,
    ));
    write_workload(dir, &publishers, &subscribers)?;

    let _ = writeln!(
        out,
        "\nworkload: {} publishers, {} subscribers (+{} that leave and resume every few seconds), {} topics, \
         through HAProxy; {} to {}",
        config.publishers,
        config.subscribers,
        config.flappers,
        config.topics,
        secs(ready_at),
        secs(ended_at)
    );
    let _ = writeln!(
        out,
        "  pub: {} sent, {} acked, refused {:?}, {} without reply; {} sessions; slowest reply {:.2}s",
        stats.published,
        stats.acked,
        stats.refused,
        stats.no_reply,
        stats.publisher_sessions,
        stats.slowest_reply.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "  sub: {} deliveries ({} of unacked pubs), {} sessions, sub errors {:?}",
        stats.delivered, stats.delivered_unacked, stats.subscriber_sessions, stats.sub_errors
    );
    let _ = writeln!(
        out,
        "  runs by start: {:?}; {} epochs; {} runs went from seq 0 of an epoch to seq 1 of another (unseen by the client, nothing missed)",
        stats.runs, stats.epochs, stats.unseen_epoch_from_start
    );
    let _ = writeln!(
        out,
        "  acked but not delivered: {} told by a notice, {} not required (before the first ok or at the end); \
         {} asked for again",
        stats.lost_told, stats.not_required, stats.requested_again
    );
    let _ = writeln!(out, "\nchecks:");
    out.push_str(&checker::render(&violations, 20));
    Ok((violations, harness_errors, out))
}

/// The workload's records, one line each, for reading after a failure.
fn write_workload(
    dir: &std::path::Path,
    publishers: &[workload::PublisherLog],
    subscribers: &[workload::SubscriberLog],
) -> Result<()> {
    let mut text = String::new();
    for p in publishers {
        for r in &p.records {
            let _ = writeln!(
                text,
                "{} p{}/c{} {} {:?}{}",
                secs(r.sent),
                r.publisher,
                r.counter,
                r.topic,
                r.outcome,
                r.replied
                    .map(|t| format!(" reply at {}", secs(t)))
                    .unwrap_or_default()
            );
        }
    }
    std::fs::write(dir.join("publishers.txt"), text)?;
    for s in subscribers {
        let mut text = String::new();
        for e in &s.events {
            let _ = writeln!(text, "{e:?}");
        }
        std::fs::write(dir.join(format!("subscriber-{}.txt", s.id)), text)?;
    }
    Ok(())
}
