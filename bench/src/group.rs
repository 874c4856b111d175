//! A group of subscribers (fan-out or per-topic), run inside one child
//! process.
//!
//! The group connects its share of subscribers, reports `READY` once every
//! subscription is confirmed, keeps reading while the parent publishes, and
//! after the parent's `DONE` waits until every subscriber has all messages
//! (or deliveries stop for the drain timeout), then reports `RESULT`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::clock::now_ns;
use crate::load::LoadArgs;
use crate::session::{AnySubscriber, FrameOutcome, SubscriberConn, SubscriberSettings};
use crate::stats::{new_histogram, DeliveryTally, DeliveryTracker, HistogramData, SharedHistogram};
use crate::topics::TopicLayout;
use crate::worker::{shares, ParentLink, Worker, WorkerSpec};
use crate::ws::{self, BufferProfile};

/// Which topic and URL each subscriber gets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Layout {
    /// Every subscriber on one topic (id 0); subscriber `n` on `urls[n % U]`.
    Fanout { topic: String, messages: u64 },
    /// Per-topic subscribers: see [`TopicLayout`].
    Topics(TopicLayout),
}

/// Where subscriber `n` goes: its URL, topic name, topic id and message count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub url: String,
    pub topic: String,
    pub topic_id: usize,
    pub messages: u64,
}

impl Layout {
    /// Subscriber `n`'s placement.
    pub fn place(&self, urls: &[String], n: usize) -> Placement {
        match self {
            Layout::Fanout { topic, messages } => Placement {
                url: ws::url_for(urls, n).to_string(),
                topic: topic.clone(),
                topic_id: 0,
                messages: *messages,
            },
            Layout::Topics(layout) => {
                let t = layout.topic_of_subscriber(n);
                Placement {
                    url: urls[layout.subscriber_url(t, urls.len())].clone(),
                    topic: layout.topic_name(t),
                    topic_id: t,
                    messages: layout.messages_of(t),
                }
            }
        }
    }
}

/// What one subscriber child does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupSpec {
    pub settings: SubscriberSettings,
    pub urls: Vec<String>,
    pub layout: Layout,
    /// Index of this group's first subscriber among all.
    pub offset: usize,
    pub count: usize,
    pub connect_concurrency: usize,
    /// The child exits by itself after this long.
    pub deadline_secs: f64,
}

/// `READY`: how the subscriptions went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReadyReport {
    pub subscribed: usize,
    pub failed: usize,
    pub first_error: Option<String>,
}

/// Starts the subscriber child processes: `subscribers` spread over
/// `load.sub_procs` workers, each holding its share of `layout`.
pub fn spawn_subscribers(
    load: &LoadArgs,
    settings: &SubscriberSettings,
    urls: &[String],
    layout: Layout,
    subscribers: usize,
) -> Result<Vec<Worker>> {
    let procs = load.sub_procs.clamp(1, subscribers);
    let mut workers = Vec::with_capacity(procs);
    for (i, (offset, count)) in shares(subscribers, procs).into_iter().enumerate() {
        let spec = WorkerSpec::Group(GroupSpec {
            settings: settings.clone(),
            urls: urls.to_vec(),
            layout: layout.clone(),
            offset,
            count,
            connect_concurrency: load.connect_concurrency,
            deadline_secs: load.timeout_secs,
        });
        workers.push(Worker::spawn(format!("subs-{i}"), &spec, load.sub_threads)?);
    }
    Ok(workers)
}

impl ReadyReport {
    /// Waits for every worker's `READY`, sums them and prints the total;
    /// fails when no subscriber at all could subscribe.
    pub async fn gather(
        workers: &mut [crate::worker::Worker],
        timeout: Duration,
    ) -> Result<ReadyReport> {
        let mut ready = ReadyReport::default();
        for worker in workers.iter_mut() {
            let r: ReadyReport = worker.expect("READY", timeout).await?;
            ready.subscribed += r.subscribed;
            ready.failed += r.failed;
            if ready.first_error.is_none() {
                ready.first_error = r.first_error;
            }
        }
        eprintln!(
            "{} subscribers ready ({} failed){}",
            ready.subscribed,
            ready.failed,
            ready
                .first_error
                .as_deref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        );
        if ready.subscribed == 0 {
            anyhow::bail!("no subscriber could subscribe");
        }
        Ok(ready)
    }
}

/// `DONE`: the publishers finished.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DoneCommand {
    /// The last `seq` acknowledged to the publisher of each topic, by topic id (Herald).
    pub final_seqs: Vec<Option<u64>>,
    /// Stop waiting when no delivery arrived for this long.
    pub drain_timeout_ms: u64,
}

/// `RESULT`: the group's counts and latencies.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GroupReport {
    pub tally: DeliveryTally,
    pub latency: HistogramData,
    /// Topics where some subscriber saw loss, duplicates, disorder or a disconnect.
    pub issues: Vec<TopicIssue>,
}

/// What went wrong on one topic (summed over its subscribers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicIssue {
    pub topic_id: usize,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub seq_lost: u64,
    pub seq_out_of_order: u64,
    pub disconnected: u64,
    pub errors: u64,
}

impl TopicIssue {
    /// The issue of one subscriber's tally, if it had any.
    pub fn of(topic_id: usize, t: &DeliveryTally) -> Option<TopicIssue> {
        let issue = TopicIssue {
            topic_id,
            lost: t.lost,
            duplicates: t.duplicates,
            out_of_order: t.out_of_order,
            seq_lost: t.seq_lost,
            seq_out_of_order: t.seq_out_of_order,
            disconnected: t.disconnected,
            errors: t.errors,
        };
        (issue
            != TopicIssue {
                topic_id,
                ..TopicIssue::default()
            })
        .then_some(issue)
    }

    /// Adds another issue of the same topic.
    pub fn merge(&mut self, o: &TopicIssue) {
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.seq_lost += o.seq_lost;
        self.seq_out_of_order += o.seq_out_of_order;
        self.disconnected += o.disconnected;
        self.errors += o.errors;
    }
}

/// Told to every subscriber at the end: the final seq of every topic.
type StopInfo = Arc<Vec<Option<u64>>>;

#[derive(Default)]
struct Progress {
    deliveries: AtomicU64,
    /// Subscribers that have every message or whose connection ended.
    settled: AtomicUsize,
}

/// Runs the group in a child process, talking to the parent through `link`.
pub async fn run(spec: GroupSpec, link: &mut ParentLink) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(spec.deadline_secs);
    let histogram: SharedHistogram = Arc::new(Mutex::new(new_histogram()));
    let progress = Arc::new(Progress::default());
    let (stop_tx, stop_rx) = watch::channel(None::<StopInfo>);
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(spec.count.max(1));
    let connect_limit = Arc::new(Semaphore::new(spec.connect_concurrency.max(1)));

    let mut tasks = Vec::with_capacity(spec.count);
    for n in 0..spec.count {
        let placement = spec.layout.place(&spec.urls, spec.offset + n);
        let topic_id = placement.topic_id;
        tasks.push((
            topic_id,
            tokio::spawn(subscriber_task(
                SubscriberJob {
                    settings: spec.settings.clone(),
                    url: placement.url,
                    topic: placement.topic,
                    messages: placement.messages,
                    topic_id,
                },
                connect_limit.clone(),
                ready_tx.clone(),
                stop_rx.clone(),
                histogram.clone(),
                progress.clone(),
            )),
        ));
    }
    drop(ready_tx);

    let mut ready = ReadyReport::default();
    while ready.subscribed + ready.failed < spec.count {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => ready.subscribed += 1,
            Ok(Some(Err(e))) => {
                ready.failed += 1;
                ready.first_error.get_or_insert(e);
            }
            Ok(None) | Err(_) => break,
        }
    }
    link.report("READY", &ready)?;

    let done = loop {
        match tokio::time::timeout_at(deadline, link.command()).await {
            Ok(Ok(Some((tag, json)))) if tag == "DONE" => {
                break Some(serde_json::from_str::<DoneCommand>(&json).context("bad DONE")?);
            }
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break None,
        }
    };

    if let Some(done) = &done {
        wait_for_drain(&progress, ready.subscribed, done.drain_timeout_ms, deadline).await;
    }
    let final_seqs = done.map(|d| d.final_seqs).unwrap_or_default();
    let _ = stop_tx.send(Some(Arc::new(final_seqs)));

    let mut tally = DeliveryTally::default();
    let mut issues: BTreeMap<usize, TopicIssue> = BTreeMap::new();
    for (topic_id, task) in tasks {
        match task.await {
            Ok(Some(sub)) => {
                tally.merge(&sub);
                if let Some(issue) = TopicIssue::of(topic_id, &sub) {
                    issues
                        .entry(topic_id)
                        .or_insert_with(|| TopicIssue {
                            topic_id,
                            ..TopicIssue::default()
                        })
                        .merge(&issue);
                }
            }
            Ok(None) => {}
            Err(e) => tally.note_error(format!("subscriber task failed: {e}")),
        }
    }
    let latency = {
        let histogram = histogram.lock().unwrap_or_else(PoisonError::into_inner);
        HistogramData::from_histogram(&histogram)
    };
    link.report(
        "RESULT",
        &GroupReport {
            tally,
            latency,
            issues: issues.into_values().collect(),
        },
    )?;
    Ok(())
}

/// Returns when every subscriber settled, deliveries stopped for the drain
/// timeout, or the deadline passed.
async fn wait_for_drain(progress: &Progress, subscribed: usize, drain_ms: u64, deadline: Instant) {
    let drain = Duration::from_millis(drain_ms);
    let mut last = progress.deliveries.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    while Instant::now() < deadline {
        if progress.settled.load(Ordering::Relaxed) >= subscribed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = progress.deliveries.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() >= drain {
            return;
        }
    }
}

struct SubscriberJob {
    settings: SubscriberSettings,
    url: String,
    topic: String,
    messages: u64,
    topic_id: usize,
}

/// One subscriber: subscribe, then read until told to stop. `None` if it never subscribed.
async fn subscriber_task(
    job: SubscriberJob,
    connect_limit: Arc<Semaphore>,
    ready_tx: mpsc::Sender<Result<(), String>>,
    mut stop_rx: watch::Receiver<Option<StopInfo>>,
    histogram: SharedHistogram,
    progress: Arc<Progress>,
) -> Option<DeliveryTally> {
    let opened = {
        let _permit = connect_limit.acquire().await.ok()?;
        AnySubscriber::open(
            &job.settings,
            &job.url,
            &job.topic,
            BufferProfile::Throughput,
        )
        .await
    };
    let mut conn = match opened {
        Ok(conn) => {
            let _ = ready_tx.send(Ok(())).await;
            conn
        }
        Err(e) => {
            let _ = ready_tx.send(Err(format!("{e:#}"))).await;
            return None;
        }
    };
    drop(ready_tx);

    let mut tracker = DeliveryTracker::new(job.messages, conn.subscribed_at_seq(), histogram);
    let mut batch = Vec::with_capacity(64);
    let mut settled = false;
    let mut ended: Option<Option<u16>> = None;
    let mut error = None;
    let mut server_errors = 0u64;
    loop {
        if stop_rx.borrow_and_update().is_some() {
            break;
        }
        tokio::select! {
            biased;
            changed = stop_rx.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            outcome = conn.next_frame(&mut batch) => match outcome {
                Ok(FrameOutcome::Data { server_errors: n }) => {
                    let now = now_ns();
                    let count = batch.len() as u64;
                    for delivery in batch.drain(..) {
                        tracker.record(delivery, now);
                    }
                    progress.deliveries.fetch_add(count, Ordering::Relaxed);
                    server_errors += u64::from(n);
                    if !settled && tracker.complete() {
                        settled = true;
                        progress.settled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(FrameOutcome::Closed { code }) => {
                    ended = Some(code);
                    break;
                }
                Err(e) => {
                    error = Some(format!("{e:#}"));
                    break;
                }
            },
        }
    }
    if ended.is_some() || error.is_some() {
        if !settled {
            progress.settled.fetch_add(1, Ordering::Relaxed);
        }
        // Wait for the final seq so that seq loss is counted to the end.
        while stop_rx.borrow_and_update().is_none() {
            if stop_rx.changed().await.is_err() {
                break;
            }
        }
    } else {
        conn.close().await;
    }
    let final_seq = stop_rx
        .borrow()
        .as_ref()
        .and_then(|seqs| seqs.get(job.topic_id).copied().flatten());
    let mut tally = tracker.finish(final_seq);
    tally.server_errors = server_errors;
    if let Some(code) = ended {
        tally.note_disconnect(code);
    }
    if let Some(e) = error {
        tally.note_error(e);
        tally.disconnected += 1;
    }
    Some(tally)
}
