//! The checker: what the workload recorded, held against the client
//! contract. Pure functions over the logs (unit-tested below with made-up
//! histories); docs/chaos.md states every rule in prose.
//!
//! Words used here:
//!
//! - The **truth** about a message is its ack: `(topic, epoch, seq)` from
//!   the `ok` its publisher got. Unacked messages have no known epoch.
//! - A subscriber's stream for one topic is cut into **runs**: stretches in
//!   which every message's seq is the previous one plus 1 (or `ok.seq` / the
//!   `since` of a recovered resume plus 1, for the first). A run starts with
//!   a `sub` `ok`, or with a message whose seq is not the next one (a
//!   *restart*: seq did not rise; a *jump*: seq rose by more than 1). A run
//!   ends with the start of the next one, with the end of its session, or
//!   is still open when the run ends.
//! - A run **claims** its positions: the subscriber believes it got every
//!   message of one epoch from the run's first seq to its last. A run that
//!   starts with `ok` (`recovered: true` or a first `sub`) also claims the
//!   positions after `since` / `ok.seq`.
//! - A **notice** is what tells a subscriber that it may have missed
//!   messages: `recovered: false`, a restart or a jump. The time from the
//!   last event of the run before a notice to the notice itself is a
//!   **gap**. So is the time from the end of a session to the next `ok`
//!   when that `ok` is not `recovered: true`, and the time after the last
//!   run, if that run's session ended and no `ok` followed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use super::workload::{PubOutcome, PublisherLog, SubEvent, SubscriberLog, LEFT};

/// Slack on either side of a gap (and after the first `ok`): the ack a
/// publisher got and a delivery to a subscriber race.
pub const SLACK: Duration = Duration::from_secs(1);
/// Acks this close to a subscriber's end need not have reached it.
pub const END_GRACE: Duration = Duration::from_secs(2);

/// The properties a run is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Check {
    /// Within an epoch, a subscriber sees seqs rise; one publisher's
    /// acked seqs rise in the order it sent.
    Order,
    /// No message twice to one subscriber on one topic.
    Duplicate,
    /// Every acked message is delivered to every subscriber that was
    /// subscribed when it was acked, unless a notice told it of a gap.
    SilentLoss,
    /// A message is delivered with the seq it was acked with.
    SeqMismatch,
    /// `recovered: true` keeps its promise: the epoch did not change and
    /// the replay is complete.
    Recovery,
    /// Every delivered message was published, on that topic.
    Phantom,
    /// No two messages acked at one (topic, epoch, seq).
    AckConflict,
    /// A `pub` with an id gets `ok` or `err` within the request timeout
    /// (while no node is paused or cut off).
    ReplyBound,
    /// Frames and fields as the contract has them.
    Contract,
    /// Every node places every live node within the bound after each heal.
    Membership,
    /// No container exits or is OOM-killed but for the faults; no panic in
    /// a node's log.
    Crash,
    /// After the last heal, publishers get acks and every subscriber is
    /// subscribed to every topic and gets messages.
    Liveness,
}

impl Check {
    pub const ALL: [Check; 12] = [
        Check::Order,
        Check::Duplicate,
        Check::SilentLoss,
        Check::SeqMismatch,
        Check::Recovery,
        Check::Phantom,
        Check::AckConflict,
        Check::ReplyBound,
        Check::Contract,
        Check::Membership,
        Check::Crash,
        Check::Liveness,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Check::Order => "order within an epoch",
            Check::Duplicate => "no duplicates",
            Check::SilentLoss => "no silent loss",
            Check::SeqMismatch => "delivered seq = acked seq",
            Check::Recovery => "recovered:true is true",
            Check::Phantom => "only published messages",
            Check::AckConflict => "one message per (epoch, seq)",
            Check::ReplyBound => "pub reply within request timeout",
            Check::Contract => "frames as the contract says",
            Check::Membership => "membership converges after heals",
            Check::Crash => "no node crashed",
            Check::Liveness => "service after the last heal",
        }
    }
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub check: Check,
    pub detail: String,
}

impl Violation {
    pub fn new(check: Check, detail: impl Into<String>) -> Violation {
        Violation {
            check,
            detail: detail.into(),
        }
    }
}

/// Counts for the report.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub published: usize,
    pub acked: usize,
    pub refused: BTreeMap<String, usize>,
    pub no_reply: usize,
    pub publisher_sessions: u32,
    pub slowest_reply: Duration,
    pub delivered: usize,
    pub subscriber_sessions: usize,
    pub sub_errors: BTreeMap<String, usize>,
    /// Runs by how they started.
    pub runs: BTreeMap<&'static str, usize>,
    /// Epochs (topic, epoch) that acked messages fell in.
    pub epochs: usize,
    /// Acked messages a subscriber missed inside a gap it was told of.
    pub lost_told: usize,
    /// Acked messages from before a subscriber's first `ok`, or too close
    /// to its end, that it did not get (not required).
    pub not_required: usize,
    /// Deliveries of unacked messages.
    pub delivered_unacked: usize,
    /// Second deliveries the subscriber asked for (its `since` was below).
    pub requested_again: usize,
    /// Runs at seq 0 of an epoch whose next message was seq 1 of another:
    /// the switch is invisible to the client but hides nothing.
    pub unseen_epoch_from_start: usize,
}

/// The truth about one acked message.
#[derive(Debug, Clone)]
struct Ack<'a> {
    epoch: &'a str,
    seq: u64,
    at: Duration,
}

type Key = (u32, u64);

/// How a run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// The first `ok` on the topic (or a `sub` without `since`).
    First,
    /// `recovered: true`: claims everything after `since`; the replay runs
    /// up to `upto` (`ok.seq`).
    Resumed { since: u64, upto: u64 },
    /// `recovered: false` (a notice).
    NotRecovered,
    /// seq did not rise (a notice).
    Restart,
    /// seq rose by more than 1 (a notice).
    Jump,
}

impl Start {
    fn name(self) -> &'static str {
        match self {
            Start::First => "first sub",
            Start::Resumed { .. } => "resumed (recovered:true)",
            Start::NotRecovered => "recovered:false",
            Start::Restart => "seq restart",
            Start::Jump => "seq jump",
        }
    }
}

#[derive(Debug, Clone)]
struct Delivery {
    seq: u64,
    key: Key,
    at: Duration,
}

#[derive(Debug, Clone)]
struct Run<'a> {
    session: u32,
    start: Start,
    /// The epoch named by the `ok` that started it.
    hint: Option<&'a str>,
    /// The seq before the first claimed position (`None`: the first
    /// message is the first position).
    anchor: Option<u64>,
    msgs: Vec<Delivery>,
    t_start: Duration,
    t_last: Duration,
    /// When it ended; `None`: open when the subscriber stopped.
    closed: Option<Duration>,
}

impl<'a> Run<'a> {
    fn new(
        session: u32,
        start: Start,
        hint: Option<&'a str>,
        anchor: Option<u64>,
        at: Duration,
    ) -> Self {
        Run {
            session,
            start,
            hint,
            anchor,
            msgs: Vec::new(),
            t_start: at,
            t_last: at,
            closed: None,
        }
    }

    fn reached(&self) -> Option<u64> {
        self.msgs.last().map(|d| d.seq).or(self.anchor)
    }

    fn describe(&self) -> String {
        let seqs = match (self.msgs.first(), self.msgs.last()) {
            (Some(f), Some(l)) => format!("seqs {}..={}", f.seq, l.seq),
            _ => "no messages".to_owned(),
        };
        format!(
            "session {}, run from {} at {} ({seqs}{}), last event {}, {}",
            self.session,
            self.start.name(),
            secs(self.t_start),
            self.hint
                .map(|e| format!(", ok epoch {e}"))
                .unwrap_or_default(),
            secs(self.t_last),
            match self.closed {
                Some(c) => format!("ended {}", secs(c)),
                None => "open at the end".to_owned(),
            }
        )
    }
}

/// Seconds with one decimal, for reports.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Everything the checker needs besides the logs.
#[derive(Debug, Clone)]
pub struct Context {
    /// Windows in which a node was paused or cut off (with margins).
    pub stall_windows: Vec<(Duration, Duration)>,
    /// The longest a reply to `pub` may take outside those windows.
    pub reply_bound: Duration,
}

/// Checks the logs; returns the violations and the counts.
pub fn check(
    publishers: &[PublisherLog],
    subscribers: &[SubscriberLog],
    ctx: &Context,
) -> (Vec<Violation>, Stats) {
    let mut v = Vec::new();
    let mut stats = Stats::default();

    // ---- what was sent and acked ----
    let mut sent: HashMap<Key, &str> = HashMap::new();
    let mut acks: HashMap<Key, Ack> = HashMap::new();
    let mut by_pos: HashMap<(&str, &str, u64), Key> = HashMap::new();
    let mut acks_by_topic: HashMap<&str, Vec<Key>> = HashMap::new();
    for log in publishers {
        stats.publisher_sessions += log.sessions;
        // One publisher's acked seqs per (topic, epoch), in send order.
        let mut last: HashMap<(&str, &str), (u64, u64)> = HashMap::new();
        for r in &log.records {
            let key = (r.publisher, r.counter);
            stats.published += 1;
            sent.insert(key, &r.topic);
            if let Some(replied) = r.replied {
                let took = replied.saturating_sub(r.sent);
                stats.slowest_reply = stats.slowest_reply.max(took);
                if took > ctx.reply_bound && !stalled(ctx, r.sent, ctx.reply_bound) {
                    v.push(Violation::new(
                        Check::ReplyBound,
                        format!(
                            "publisher {} counter {} on {}: reply after {:.2}s (sent at {}), bound {:.1}s",
                            r.publisher,
                            r.counter,
                            r.topic,
                            took.as_secs_f64(),
                            secs(r.sent),
                            ctx.reply_bound.as_secs_f64()
                        ),
                    ));
                }
            }
            match &r.outcome {
                PubOutcome::Acked { seq, epoch } => {
                    stats.acked += 1;
                    let at = r.replied.unwrap_or(r.sent);
                    acks.insert(
                        key,
                        Ack {
                            epoch,
                            seq: *seq,
                            at,
                        },
                    );
                    acks_by_topic.entry(&r.topic).or_default().push(key);
                    if let Some(other) = by_pos.insert((&r.topic, epoch, *seq), key) {
                        v.push(Violation::new(
                            Check::AckConflict,
                            format!(
                                "{} epoch {epoch} seq {seq} acked to both {} and {}",
                                r.topic,
                                show(other),
                                show(key)
                            ),
                        ));
                    }
                    if let Some((prev_seq, prev_counter)) =
                        last.insert((&r.topic, epoch), (*seq, r.counter))
                    {
                        if prev_seq >= *seq {
                            v.push(Violation::new(
                                Check::Order,
                                format!(
                                    "publisher {}: on {} epoch {epoch}, counter {} was acked with seq {prev_seq} \
                                     and the later counter {} with seq {seq}",
                                    r.publisher, r.topic, prev_counter, r.counter
                                ),
                            ));
                        }
                    }
                }
                PubOutcome::Refused { code } => {
                    *stats.refused.entry(code.clone()).or_default() += 1;
                }
                PubOutcome::NoReply { reason } => {
                    stats.no_reply += 1;
                    if reason.starts_with("no reply") && !stalled(ctx, r.sent, ctx.reply_bound) {
                        v.push(Violation::new(
                            Check::ReplyBound,
                            format!(
                                "publisher {} counter {} on {}: {reason} (sent at {})",
                                r.publisher,
                                r.counter,
                                r.topic,
                                secs(r.sent)
                            ),
                        ));
                    }
                }
            }
        }
    }
    stats.epochs = by_pos
        .keys()
        .map(|(t, e, _)| (*t, *e))
        .collect::<HashSet<_>>()
        .len();

    // ---- every subscriber, every topic ----
    for log in subscribers {
        let streams = build_runs(log, &mut v, &mut stats);
        for (topic, runs) in streams {
            check_stream(
                log,
                topic,
                &runs,
                &Truth {
                    sent: &sent,
                    acks: &acks,
                    by_pos: &by_pos,
                    acks_by_topic: &acks_by_topic,
                },
                &mut v,
                &mut stats,
            );
        }
    }
    (v, stats)
}

fn show(key: Key) -> String {
    format!("p{}/c{}", key.0, key.1)
}

/// Whether `[sent, sent + bound]` touches a stall window.
fn stalled(ctx: &Context, sent: Duration, bound: Duration) -> bool {
    ctx.stall_windows
        .iter()
        .any(|&(a, b)| sent <= b && sent + bound >= a)
}

/// Cuts one subscriber's events into runs per topic (see the module doc).
fn build_runs<'a>(
    log: &'a SubscriberLog,
    v: &mut Vec<Violation>,
    stats: &mut Stats,
) -> BTreeMap<&'a str, Vec<Run<'a>>> {
    let mut done: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    let mut current: BTreeMap<&str, Run> = BTreeMap::new();
    let who = log.id;
    for event in &log.events {
        match event {
            SubEvent::Connected { .. } => stats.subscriber_sessions += 1,
            SubEvent::Ended { session, at, .. } => {
                let ending: Vec<&str> = current
                    .iter()
                    .filter(|(_, r)| r.session == *session)
                    .map(|(t, _)| *t)
                    .collect();
                for topic in ending {
                    if let Some(mut run) = current.remove(topic) {
                        run.closed = Some(*at);
                        done.entry(topic).or_default().push(run);
                    }
                }
            }
            SubEvent::SubErr { code, .. } => {
                *stats.sub_errors.entry(code.clone()).or_default() += 1;
            }
            SubEvent::Bad { at, what, .. } => v.push(Violation::new(
                Check::Contract,
                format!("subscriber {who} at {}: {what}", secs(*at)),
            )),
            SubEvent::Ok {
                session,
                at,
                topic,
                seq,
                epoch,
                since,
                sent_epoch,
                recovered,
            } => {
                let topic = topic.as_str();
                if let Some(mut run) = current.remove(topic) {
                    run.closed = Some(*at);
                    done.entry(topic).or_default().push(run);
                }
                let is_first = !done.contains_key(topic);
                let (start, anchor) = match (since, recovered) {
                    (None, recovered) => {
                        if recovered.is_some() {
                            v.push(Violation::new(
                                Check::Contract,
                                format!(
                                    "subscriber {who} {topic} at {}: `recovered` in the ok of a sub without since",
                                    secs(*at)
                                ),
                            ));
                        }
                        let start = if is_first {
                            Start::First
                        } else {
                            Start::NotRecovered
                        };
                        (start, Some(*seq))
                    }
                    (Some(since), Some(true)) => {
                        if sent_epoch.as_deref().is_some_and(|e| e != epoch) {
                            v.push(Violation::new(
                                Check::Recovery,
                                format!(
                                    "subscriber {who} {topic} at {}: recovered:true for since {since} epoch {} \
                                     but the ok names epoch {epoch}",
                                    secs(*at),
                                    sent_epoch.as_deref().unwrap_or("-")
                                ),
                            ));
                        }
                        if *since > *seq {
                            v.push(Violation::new(
                                Check::Recovery,
                                format!(
                                    "subscriber {who} {topic} at {}: recovered:true for since {since} beyond ok.seq {seq}",
                                    secs(*at)
                                ),
                            ));
                        }
                        (
                            Start::Resumed {
                                since: *since,
                                upto: *seq,
                            },
                            Some(*since),
                        )
                    }
                    (Some(_), Some(false)) => {
                        // In the same epoch, what history still holds is
                        // replayed first, from below ok.seq.
                        let same = sent_epoch.as_deref() == Some(epoch.as_str());
                        (Start::NotRecovered, (!same).then_some(*seq))
                    }
                    (Some(since), None) => {
                        v.push(Violation::new(
                            Check::Contract,
                            format!(
                                "subscriber {who} {topic} at {}: ok to a sub with since {since} has no `recovered`",
                                secs(*at)
                            ),
                        ));
                        (Start::NotRecovered, Some(*seq))
                    }
                };
                current.insert(topic, Run::new(*session, start, Some(epoch), anchor, *at));
            }
            SubEvent::Msg {
                session,
                at,
                topic,
                seq,
                publisher,
                counter,
            } => {
                stats.delivered += 1;
                let topic = topic.as_str();
                let delivery = Delivery {
                    seq: *seq,
                    key: (*publisher, *counter),
                    at: *at,
                };
                let Some(run) = current.get_mut(topic) else {
                    v.push(Violation::new(
                        Check::Contract,
                        format!(
                            "subscriber {who} {topic} at {}: msg seq {seq} with no subscription in this session",
                            secs(*at)
                        ),
                    ));
                    let mut run = Run::new(*session, Start::Restart, None, None, *at);
                    run.msgs.push(delivery);
                    current.insert(topic, run);
                    continue;
                };
                let expected = run.reached().map(|r| r + 1);
                match expected {
                    Some(next) if next != *seq => {
                        if let Start::Resumed { since, upto } = run.start {
                            if next <= upto {
                                v.push(Violation::new(
                                    Check::Recovery,
                                    format!(
                                        "subscriber {who} {topic} at {}: after recovered:true (since {since}, \
                                         ok.seq {upto}) the replay should go on with seq {next}, got seq {seq}",
                                        secs(*at)
                                    ),
                                ));
                            }
                        }
                        let start = if *seq < next {
                            Start::Restart
                        } else {
                            Start::Jump
                        };
                        let mut old =
                            std::mem::replace(run, Run::new(*session, start, None, None, *at));
                        old.closed = Some(*at);
                        done.entry(topic).or_default().push(old);
                    }
                    _ => {}
                }
                run.msgs.push(delivery);
                run.t_last = *at;
            }
        }
    }
    for (topic, run) in current {
        done.entry(topic).or_default().push(run);
    }
    for runs in done.values() {
        for run in runs {
            *stats.runs.entry(run.start.name()).or_default() += 1;
        }
    }
    done
}

struct Truth<'t, 'a> {
    sent: &'t HashMap<Key, &'a str>,
    acks: &'t HashMap<Key, Ack<'a>>,
    by_pos: &'t HashMap<(&'a str, &'a str, u64), Key>,
    acks_by_topic: &'t HashMap<&'a str, Vec<Key>>,
}

/// Checks one subscriber's runs on one topic against the truth.
fn check_stream(
    log: &SubscriberLog,
    topic: &str,
    runs: &[Run],
    truth: &Truth,
    v: &mut Vec<Violation>,
    stats: &mut Stats,
) {
    let who = log.id;
    let mut delivered: HashMap<Key, (usize, u64)> = HashMap::new();
    let mut last_in_epoch: HashMap<&str, u64> = HashMap::new();
    // Positions checked by runs: (epoch, first, last).
    let mut covered: Vec<(&str, u64, u64)> = Vec::new();
    for (ri, run) in runs.iter().enumerate() {
        // A resume asks for everything after `since` again: what comes next
        // may be below seqs of that epoch seen since then (and those seen
        // again are the replay it asked for).
        if let (Start::Resumed { since, .. }, Some(e)) = (run.start, run.hint) {
            if let Some(last) = last_in_epoch.get_mut(e) {
                *last = (*last).min(since);
            }
        }
        let mut epoch: Option<&str> = run.hint.or_else(|| {
            run.msgs
                .iter()
                .find_map(|d| truth.acks.get(&d.key).map(|a| a.epoch))
        });
        let mut seg_first = run.anchor.map(|a| a + 1);
        let mut seg_last = run.anchor;
        for d in &run.msgs {
            // Duplicates (unless the subscriber asked for it again: a
            // replay after a `since` below it).
            if let Some(&(first_run, first_seq)) = delivered.get(&d.key) {
                let asked = match run.start {
                    Start::Resumed { since, upto } => {
                        first_run < ri && d.seq > since && d.seq <= upto && first_seq == d.seq
                    }
                    _ => false,
                };
                if asked {
                    stats.requested_again += 1;
                    continue;
                }
                v.push(Violation::new(
                    Check::Duplicate,
                    format!(
                        "subscriber {who} {topic}: {} delivered again at {} as seq {} (first as seq {first_seq}); {}",
                        show(d.key),
                        secs(d.at),
                        d.seq,
                        run.describe()
                    ),
                ));
                continue;
            }
            delivered.insert(d.key, (ri, d.seq));
            match truth.sent.get(&d.key) {
                None => v.push(Violation::new(
                    Check::Phantom,
                    format!(
                        "subscriber {who} {topic}: {} (seq {}) was never published",
                        show(d.key),
                        d.seq
                    ),
                )),
                Some(t) if *t != topic => v.push(Violation::new(
                    Check::Phantom,
                    format!(
                        "subscriber {who}: {} published on {t} was delivered on {topic}",
                        show(d.key)
                    ),
                )),
                Some(_) => {}
            }
            match truth.acks.get(&d.key) {
                Some(ack) => {
                    if ack.seq != d.seq {
                        v.push(Violation::new(
                            Check::SeqMismatch,
                            format!(
                                "subscriber {who} {topic}: {} delivered as seq {} but acked as epoch {} seq {}",
                                show(d.key),
                                d.seq,
                                ack.epoch,
                                ack.seq
                            ),
                        ));
                    }
                    if let Some(prev) = last_in_epoch.insert(ack.epoch, ack.seq) {
                        if prev >= ack.seq {
                            v.push(Violation::new(
                                Check::Order,
                                format!(
                                    "subscriber {who} {topic} epoch {}: seq {} delivered at {} after seq {prev}",
                                    ack.epoch,
                                    ack.seq,
                                    secs(d.at)
                                ),
                            ));
                        }
                    }
                    if let Some(e) = epoch {
                        // An epoch change the subscriber cannot see hides the
                        // new epoch's messages before this one: none when
                        // this is the new epoch's first (a run that was at
                        // seq 0 of the old one; the old epoch's acked
                        // messages it missed are checked below, with the
                        // rest).
                        if e != ack.epoch && d.seq == 1 {
                            stats.unseen_epoch_from_start += 1;
                        } else if e != ack.epoch {
                            v.push(Violation::new(
                                Check::SilentLoss,
                                format!(
                                    "subscriber {who} {topic}: seq {} at {} follows on without a gap, but is {} \
                                     of epoch {} while the run is in epoch {e}: the epoch changed unseen; {}",
                                    d.seq,
                                    secs(d.at),
                                    show(d.key),
                                    ack.epoch,
                                    run.describe()
                                ),
                            ));
                            if let (Some(f), Some(l)) = (seg_first, seg_last) {
                                covered.push((e, f, l));
                            }
                            seg_first = Some(d.seq);
                        }
                    }
                    epoch = Some(ack.epoch);
                }
                None => stats.delivered_unacked += 1,
            }
            if seg_first.is_none() {
                seg_first = Some(d.seq);
            }
            seg_last = Some(d.seq);
            // The position must hold the message acked there, if any.
            if let Some(e) = epoch {
                if let Some(&k) = truth.by_pos.get(&(topic, e, d.seq)) {
                    if k != d.key {
                        let ack = &truth.acks[&k];
                        v.push(Violation::new(
                            Check::SilentLoss,
                            format!(
                                "subscriber {who} {topic}: {} acked at {} as epoch {e} seq {} never came; {} \
                                 came at that position at {}; {}",
                                show(k),
                                secs(ack.at),
                                d.seq,
                                show(d.key),
                                secs(d.at),
                                run.describe()
                            ),
                        ));
                    }
                }
            }
        }
        if let (Some(e), Some(f), Some(l)) = (epoch, seg_first, seg_last) {
            covered.push((e, f, l));
        }
    }

    // ---- acked messages that never came ----
    let Some(first_ok) = runs.iter().find(|r| r.hint.is_some()) else {
        return;
    };
    let first_ok_at = first_ok.t_start;
    let before_sub = |ack: &Ack| {
        first_ok.start == Start::First
            && first_ok.hint == Some(ack.epoch)
            && first_ok.anchor.is_some_and(|n| ack.seq <= n)
    };
    let mut gaps: Vec<(Duration, Duration)> = Vec::new();
    for pair in runs.windows(2) {
        if !matches!(pair[1].start, Start::Resumed { .. }) {
            gaps.push((pair[0].t_last, pair[1].t_start));
        }
    }
    if let Some(last) = runs.last() {
        if last.closed.is_some() {
            gaps.push((last.t_last, log.stopped));
        }
    }
    let Some(keys) = truth.acks_by_topic.get(topic) else {
        return;
    };
    for key in keys {
        if delivered.contains_key(key) {
            continue;
        }
        let ack = &truth.acks[key];
        if ack.at < first_ok_at + SLACK || before_sub(ack) || ack.at + END_GRACE > log.stopped {
            stats.not_required += 1;
            continue;
        }
        if covered
            .iter()
            .any(|&(e, f, l)| e == ack.epoch && (f..=l).contains(&ack.seq))
        {
            // A run holds that position: reported above.
            continue;
        }
        if gaps
            .iter()
            .any(|&(a, b)| ack.at + SLACK >= a && ack.at <= b + SLACK)
        {
            stats.lost_told += 1;
            continue;
        }
        let during = runs
            .iter()
            .find(|r| r.t_start <= ack.at && r.closed.is_none_or(|c| ack.at <= c))
            .map(Run::describe)
            .or_else(|| {
                // Away between a session's end and a recovered:true resume.
                runs.windows(2).find_map(|pair| {
                    let (before, after) = (&pair[0], &pair[1]);
                    let Start::Resumed { since, upto } = after.start else {
                        return None;
                    };
                    let away = before.closed.filter(|&c| c <= ack.at && ack.at <= after.t_start)?;
                    Some(format!(
                        "away from {} (session {} ended) until {}, then resumed with since {since}: \
                         recovered:true, epoch {}, ok.seq {upto}",
                        secs(away),
                        before.session,
                        secs(after.t_start),
                        after.hint.unwrap_or("-")
                    ))
                })
            })
            .unwrap_or_else(|| "between runs".to_owned());
        v.push(Violation::new(
            Check::SilentLoss,
            format!(
                "subscriber {who} {topic}: {} acked at {} as epoch {} seq {} never came, and no notice covers it; \
                 at that time: {during}",
                show(*key),
                secs(ack.at),
                ack.epoch,
                ack.seq
            ),
        ));
    }
}

/// Liveness after the last heal: every publisher got an ack for a `pub`
/// sent after `since`, and every subscriber's last session had an `ok` for
/// every topic and ended only because the run stopped (or, for a flapping
/// subscriber, because it left), and it got a message of every topic after
/// `since`.
pub fn liveness(
    publishers: &[PublisherLog],
    subscribers: &[SubscriberLog],
    topics: &[String],
    since: Duration,
) -> Vec<Violation> {
    let mut v = Vec::new();
    for log in publishers {
        let acked = log
            .records
            .iter()
            .any(|r| r.sent >= since && matches!(r.outcome, PubOutcome::Acked { .. }));
        if !acked {
            let last: Vec<String> = log
                .records
                .iter()
                .rev()
                .take(3)
                .map(|r| format!("{:?} at {}", r.outcome, secs(r.sent)))
                .collect();
            v.push(Violation::new(
                Check::Liveness,
                format!(
                    "publisher {}: no ack for a pub sent after {} (last: {})",
                    log.id,
                    secs(since),
                    last.join("; ")
                ),
            ));
        }
    }
    for log in subscribers {
        // The last session: subscribed to what, and how it ended.
        let mut subscribed: HashSet<&str> = HashSet::new();
        let mut end: Option<&str> = None;
        let mut fresh: HashSet<&str> = HashSet::new();
        for e in &log.events {
            match e {
                SubEvent::Connected { .. } => {
                    subscribed.clear();
                    end = None;
                }
                SubEvent::Ok { topic, .. } => {
                    subscribed.insert(topic);
                }
                SubEvent::Ended { reason, .. } => end = Some(reason),
                SubEvent::Msg { at, topic, .. } if *at >= since => {
                    fresh.insert(topic);
                }
                _ => {}
            }
        }
        // Stopping ends the last session on purpose, and a flapping
        // subscriber may be away when the run stops.
        let clean = matches!(end, None | Some("stopped") | Some(LEFT));
        for topic in topics {
            let topic = topic.as_str();
            let problem = if !clean || !subscribed.contains(topic) {
                format!(
                    "not subscribed at the end (last session ended: {})",
                    end.unwrap_or("-")
                )
            } else if !fresh.contains(topic) {
                format!("no message after {}", secs(since))
            } else {
                continue;
            };
            v.push(Violation::new(
                Check::Liveness,
                format!("subscriber {} {topic}: {problem}", log.id),
            ));
        }
    }
    v
}

/// The violations, grouped by check, for the report (at most `per_check`
/// lines each).
pub fn render(violations: &[Violation], per_check: usize) -> String {
    let mut out = String::new();
    let mut by_check: BTreeMap<Check, Vec<&Violation>> = BTreeMap::new();
    for x in violations {
        by_check.entry(x.check).or_default().push(x);
    }
    for check in Check::ALL {
        let n = by_check.get(&check).map_or(0, Vec::len);
        let _ = writeln!(
            out,
            "  {:<36} {}",
            check.name(),
            if n == 0 {
                "ok".to_owned()
            } else {
                format!("{n} VIOLATION(S)")
            }
        );
    }
    for (check, list) in by_check {
        let _ = writeln!(out, "\n{} ({}):", check.name(), list.len());
        for x in list.iter().take(per_check) {
            let _ = writeln!(out, "  - {}", x.detail);
        }
        if list.len() > per_check {
            let _ = writeln!(out, "  ... and {} more", list.len() - per_check);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::workload::PubRecord;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// One `pub`: (counter, topic, sent ms, acked as (seq, epoch)).
    type Rec = (u64, &'static str, u64, Option<(u64, &'static str)>);

    /// A publisher log.
    fn publisher(id: u32, recs: &[Rec]) -> PublisherLog {
        PublisherLog {
            id,
            sessions: 1,
            connect_failures: 0,
            records: recs
                .iter()
                .map(|&(counter, topic, sent, ack)| PubRecord {
                    publisher: id,
                    counter,
                    topic: topic.to_owned(),
                    sent: ms(sent),
                    replied: ack.map(|_| ms(sent + 5)),
                    outcome: match ack {
                        Some((seq, epoch)) => PubOutcome::Acked {
                            seq,
                            epoch: epoch.to_owned(),
                        },
                        None => PubOutcome::Refused {
                            code: "unavailable".to_owned(),
                        },
                    },
                })
                .collect(),
        }
    }

    fn ok(
        session: u32,
        at: u64,
        seq: u64,
        epoch: &str,
        since: Option<(u64, &str)>,
        recovered: Option<bool>,
    ) -> SubEvent {
        SubEvent::Ok {
            session,
            at: ms(at),
            topic: "t".to_owned(),
            seq,
            epoch: epoch.to_owned(),
            since: since.map(|s| s.0),
            sent_epoch: since.map(|s| s.1.to_owned()),
            recovered,
        }
    }

    fn msg(session: u32, at: u64, seq: u64, counter: u64) -> SubEvent {
        SubEvent::Msg {
            session,
            at: ms(at),
            topic: "t".to_owned(),
            seq,
            publisher: 0,
            counter,
        }
    }

    fn ended(session: u32, at: u64) -> SubEvent {
        SubEvent::Ended {
            session,
            at: ms(at),
            reason: "Eof".to_owned(),
        }
    }

    fn subscriber(events: Vec<SubEvent>, stopped: u64) -> SubscriberLog {
        SubscriberLog {
            id: 0,
            events,
            stopped: ms(stopped),
            connect_failures: 0,
        }
    }

    fn run_check(p: PublisherLog, s: SubscriberLog) -> (Vec<Violation>, Stats) {
        let ctx = Context {
            stall_windows: vec![],
            reply_bound: Duration::from_secs(4),
        };
        check(&[p], &[s], &ctx)
    }

    fn checks(v: &[Violation]) -> Vec<Check> {
        let mut c: Vec<Check> = v.iter().map(|x| x.check).collect();
        c.dedup();
        c
    }

    /// Messages 1..=n on topic t in epoch e, 1 s apart from `from` ms.
    fn acked(n: u64, e: &'static str, from: u64) -> Vec<Rec> {
        (1..=n)
            .map(|i| (i, "t", from + i * 1000, Some((i, e))))
            .collect()
    }

    #[test]
    fn a_clean_history_passes() {
        let p = publisher(0, &acked(5, "E", 1000));
        let mut ev = vec![ok(1, 500, 0, "E", None, None)];
        ev.extend((1..=5).map(|i| msg(1, 1000 + i * 1000 + 10, i, i)));
        let (v, stats) = run_check(p, subscriber(ev, 20_000));
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(stats.delivered, 5);
    }

    #[test]
    fn a_missing_message_in_a_continuous_epoch_is_a_silent_loss() {
        let p = publisher(0, &acked(5, "E", 1000));
        let mut ev = vec![ok(1, 500, 0, "E", None, None)];
        // Seq 3 never comes: seqs 1, 2, 4, 5 is a jump (a notice)...
        ev.extend(
            [1u64, 2, 4, 5]
                .iter()
                .map(|&i| msg(1, 1000 + i * 1000 + 10, i, i)),
        );
        let (v, stats) = run_check(p, subscriber(ev, 20_000));
        assert!(v.is_empty(), "a visible jump is a told gap: {v:?}");
        assert_eq!(stats.lost_told, 1);
        // ...but the same loss with no further message of the topic while
        // the subscriber stays subscribed is silent.
        let p = publisher(0, &acked(5, "E", 1000));
        let mut ev = vec![ok(1, 500, 0, "E", None, None)];
        ev.extend((1..=2).map(|i| msg(1, 1000 + i * 1000 + 10, i, i)));
        let (v, _) = run_check(p, subscriber(ev, 20_000));
        assert_eq!(checks(&v), vec![Check::SilentLoss], "{v:?}");
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn an_unseen_epoch_change_is_caught_by_the_acks() {
        // Epoch E: 1..=3 acked; then the topic moves to F, whose 1..=3 are
        // acked before this subscriber's node registers, and F's 4 arrives
        // right after E's 3: the stream looks continuous.
        let mut recs = acked(3, "E", 1000);
        recs.extend((4..=7).map(|c| (c, "t", 1000 + c * 1000, Some((c - 3, "F")))));
        let p = publisher(0, &recs);
        let mut ev = vec![ok(1, 500, 0, "E", None, None)];
        ev.extend((1..=3).map(|i| msg(1, 1000 + i * 1000 + 10, i, i)));
        ev.push(msg(1, 8010, 4, 7)); // F seq 4 as if it were E seq 4
        let (v, _) = run_check(p, subscriber(ev, 20_000));
        assert!(
            v.iter()
                .any(|x| x.check == Check::SilentLoss && x.detail.contains("unseen")),
            "{v:?}"
        );
    }

    #[test]
    fn an_unseen_switch_from_seq_0_to_a_new_epoch_hides_nothing() {
        // The ok says E at seq 0; the topic moves before E has a message,
        // and F's messages come from its seq 1: nothing of either is missed.
        let recs: Vec<Rec> = (1..=3)
            .map(|c| (c, "t", 1000 + c * 1000, Some((c, "F"))))
            .collect();
        let mut ev = vec![ok(1, 500, 0, "E", None, None)];
        ev.extend((1..=3).map(|i| msg(1, 1000 + i * 1000 + 10, i, i)));
        let (v, stats) = run_check(publisher(0, &recs), subscriber(ev, 20_000));
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(stats.unseen_epoch_from_start, 1);
    }

    #[test]
    fn an_unseen_switch_from_seq_0_still_misses_the_old_epochs_acked_messages() {
        // As above, but E did sequence (and ack) a message this subscriber
        // never got: that loss is reported.
        let mut recs = acked(1, "E", 1000);
        recs.extend((2..=4).map(|c| (c, "t", 1000 + c * 1000, Some((c - 1, "F")))));
        let mut ev = vec![ok(1, 500, 0, "E", None, None)];
        ev.extend((1..=3).map(|i| msg(1, 2000 + i * 1000 + 10, i, i + 1)));
        let (v, _) = run_check(publisher(0, &recs), subscriber(ev, 20_000));
        assert_eq!(checks(&v), [Check::SilentLoss], "{v:?}");
        assert!(v[0].detail.contains("never came"), "{v:?}");
    }

    #[test]
    fn a_restart_or_recovered_false_covers_the_loss() {
        let mut recs = acked(4, "E", 1000);
        recs.extend((5..=8).map(|c| (c, "t", 1000 + c * 1000, Some((c - 4, "F")))));
        let p = publisher(0, &recs);
        // E 1, 2 then (E 3, 4 lost with their owner) F from seq 2: restart.
        let ev = vec![
            ok(1, 500, 0, "E", None, None),
            msg(1, 2010, 1, 1),
            msg(1, 3010, 2, 2),
            msg(1, 7010, 2, 6),
            msg(1, 8010, 3, 7),
            msg(1, 9010, 4, 8),
        ];
        let (v, stats) = run_check(p.clone(), subscriber(ev, 20_000));
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(stats.lost_told, 3); // E 3, E 4, F 1
                                        // The same through a reconnect answered with recovered:false.
        let ev = vec![
            ok(1, 500, 0, "E", None, None),
            msg(1, 2010, 1, 1),
            msg(1, 3010, 2, 2),
            ended(1, 3500),
            ok(2, 6500, 1, "F", Some((2, "E")), Some(false)),
            msg(2, 7010, 2, 6),
            msg(2, 8010, 3, 7),
            msg(2, 9010, 4, 8),
        ];
        let (v, stats) = run_check(p, subscriber(ev, 20_000));
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(stats.lost_told, 3);
    }

    #[test]
    fn recovered_true_must_replay_everything() {
        let p = publisher(0, &acked(6, "E", 1000));
        let ev = vec![
            ok(1, 500, 0, "E", None, None),
            msg(1, 2010, 1, 1),
            msg(1, 3010, 2, 2),
            ended(1, 3500),
            ok(2, 5500, 4, "E", Some((2, "E")), Some(true)),
            // Replay of 3 is missing: 4 comes first.
            msg(2, 5510, 4, 4),
            msg(2, 6010, 5, 5),
            msg(2, 7010, 6, 6),
        ];
        let (v, _) = run_check(p.clone(), subscriber(ev, 20_000));
        assert!(v.iter().any(|x| x.check == Check::Recovery), "{v:?}");
        // A complete replay passes, and the gap while disconnected is
        // claimed, not told.
        let ev = vec![
            ok(1, 500, 0, "E", None, None),
            msg(1, 2010, 1, 1),
            msg(1, 3010, 2, 2),
            ended(1, 3500),
            ok(2, 5500, 4, "E", Some((2, "E")), Some(true)),
            msg(2, 5510, 3, 3),
            msg(2, 5510, 4, 4),
            msg(2, 6010, 5, 5),
            msg(2, 7010, 6, 6),
        ];
        let (v, stats) = run_check(p, subscriber(ev, 20_000));
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(stats.lost_told, 0);
    }

    #[test]
    fn a_replay_asked_for_again_is_neither_a_duplicate_nor_out_of_order() {
        // E 1..=3; the topic moves (F 1, 2: a restart, so the subscriber
        // keeps since 3 in E); E comes back at its old owner and goes on
        // with 5, 6 (4 was lost then: a jump); the subscriber resumes with
        // since 3 and gets 4, 5, 6 again.
        let mut recs = acked(6, "E", 1000);
        recs.extend([
            (7, "t", 4200, Some((1, "F"))),
            (8, "t", 4300, Some((2, "F"))),
        ]);
        let p = publisher(0, &recs);
        let ev = vec![
            ok(1, 500, 0, "E", None, None),
            msg(1, 2010, 1, 1),
            msg(1, 3010, 2, 2),
            msg(1, 4010, 3, 3),
            msg(1, 4210, 1, 7),
            msg(1, 4310, 2, 8),
            msg(1, 6010, 5, 5),
            msg(1, 7010, 6, 6),
            ended(1, 7500),
            ok(2, 8000, 6, "E", Some((3, "E")), Some(true)),
            msg(2, 8001, 4, 4),
            msg(2, 8002, 5, 5),
            msg(2, 8003, 6, 6),
        ];
        let (v, stats) = run_check(p, subscriber(ev, 20_000));
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(stats.requested_again, 2);
    }

    #[test]
    fn recovered_true_that_hides_another_epoch_is_a_silent_loss() {
        // E 1..=3 at its owner; the topic moves to F (1, 2 seen live: a
        // restart); the subscriber leaves; F 3, 4 are acked; the old owner
        // takes the topic back and goes on with E; the subscriber resumes
        // with since 3 in E and is told recovered:true. F 3, 4 are lost and
        // nothing said so.
        let mut recs = acked(3, "E", 1000);
        recs.extend([
            (7, "t", 4200, Some((1, "F"))),
            (8, "t", 4300, Some((2, "F"))),
            (9, "t", 5500, Some((3, "F"))),
            (10, "t", 6000, Some((4, "F"))),
        ]);
        let p = publisher(0, &recs);
        let ev = vec![
            ok(1, 500, 0, "E", None, None),
            msg(1, 2010, 1, 1),
            msg(1, 3010, 2, 2),
            msg(1, 4010, 3, 3),
            msg(1, 4210, 1, 7),
            msg(1, 4310, 2, 8),
            ended(1, 4500),
            ok(2, 7000, 3, "E", Some((3, "E")), Some(true)),
        ];
        let (v, _) = run_check(p, subscriber(ev, 20_000));
        assert_eq!(checks(&v), vec![Check::SilentLoss], "{v:?}");
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].detail.contains("recovered:true, epoch E"), "{v:?}");
    }

    #[test]
    fn recovered_true_across_an_epoch_change_is_a_violation() {
        let p = publisher(0, &acked(2, "E", 1000));
        let ev = vec![
            ok(1, 500, 0, "E", None, None),
            ended(1, 900),
            ok(2, 1000, 0, "F", Some((0, "E")), Some(true)),
        ];
        let (v, _) = run_check(p, subscriber(ev, 1500));
        assert_eq!(checks(&v), vec![Check::Recovery], "{v:?}");
    }

    #[test]
    fn duplicates_reorders_and_seq_mismatches_are_caught() {
        let p = publisher(0, &acked(4, "E", 1000));
        let ev = vec![
            ok(1, 500, 0, "E", None, None),
            msg(1, 2010, 1, 1),
            msg(1, 3010, 2, 2),
            msg(1, 3020, 2, 2), // the same message again (also a restart)
            msg(1, 4010, 3, 4), // counter 4 delivered as seq 3
        ];
        let (v, _) = run_check(p, subscriber(ev, 4500));
        let c = checks(&v);
        assert!(c.contains(&Check::Duplicate), "{v:?}");
        assert!(c.contains(&Check::SeqMismatch), "{v:?}");
        assert!(
            c.contains(&Check::SilentLoss),
            "counter 3 lost at its position: {v:?}"
        );
        let p = publisher(0, &acked(3, "E", 1000));
        let ev = vec![
            ok(1, 500, 0, "E", None, None),
            msg(1, 2010, 2, 2),
            msg(1, 2020, 1, 1),
            msg(1, 4010, 3, 3),
        ];
        let (v, _) = run_check(p, subscriber(ev, 4500));
        assert!(checks(&v).contains(&Check::Order), "{v:?}");
    }

    #[test]
    fn phantoms_and_conflicting_acks_are_caught() {
        let mut recs = acked(2, "E", 1000);
        recs.push((3, "t", 3500, Some((2, "E"))));
        let p = publisher(0, &recs);
        let ev = vec![
            ok(1, 500, 0, "E", None, None),
            msg(1, 2010, 1, 1),
            msg(1, 2020, 2, 99),
        ];
        let (v, _) = run_check(p, subscriber(ev, 2500));
        let c = checks(&v);
        assert!(c.contains(&Check::AckConflict), "{v:?}");
        assert!(c.contains(&Check::Phantom), "{v:?}");
    }

    #[test]
    fn messages_before_the_subscription_or_at_the_end_are_not_required() {
        let p = publisher(0, &acked(5, "E", 0));
        // Subscribed at 2.5 s with seq 2; stops at 5.5 s (5 acked at 5 s).
        let ev = vec![
            ok(1, 2500, 2, "E", None, None),
            msg(1, 3010, 3, 3),
            msg(1, 4010, 4, 4),
        ];
        let (v, stats) = run_check(p, subscriber(ev, 5500));
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(stats.not_required, 3);
    }

    #[test]
    fn a_split_brain_loss_while_the_run_goes_on_is_silent() {
        // E goes on at one owner while another acks F 1 at 2.5 s; the
        // subscriber keeps getting E and never sees F.
        let mut recs = acked(4, "E", 1000);
        recs.push((9, "t", 2495, Some((1, "F"))));
        let p = publisher(0, &recs);
        let mut ev = vec![ok(1, 500, 0, "E", None, None)];
        ev.extend((1..=4).map(|i| msg(1, 1000 + i * 1000 + 10, i, i)));
        let (v, _) = run_check(p, subscriber(ev, 20_000));
        assert_eq!(checks(&v), vec![Check::SilentLoss], "{v:?}");
        assert!(v[0].detail.contains("p0/c9"), "{v:?}");
    }

    #[test]
    fn replies_later_than_the_bound_count_outside_stalls() {
        let mut p = publisher(0, &acked(2, "E", 1000));
        p.records[0].replied = Some(ms(1000 + 1000 + 6000));
        let ctx = Context {
            stall_windows: vec![],
            reply_bound: Duration::from_secs(4),
        };
        let (v, _) = check(&[p.clone()], &[], &ctx);
        assert_eq!(checks(&v), vec![Check::ReplyBound]);
        let ctx = Context {
            stall_windows: vec![(ms(2500), ms(9000))],
            reply_bound: Duration::from_secs(4),
        };
        let (v, _) = check(&[p], &[], &ctx);
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn liveness_wants_acks_and_fresh_messages_after_the_heal() {
        let p = publisher(0, &acked(3, "E", 0));
        let ev = vec![
            SubEvent::Connected {
                session: 1,
                at: ms(0),
            },
            ok(1, 100, 0, "E", None, None),
            msg(1, 1010, 1, 1),
            msg(1, 3010, 3, 3),
            SubEvent::Ended {
                session: 1,
                at: ms(4000),
                reason: "stopped".to_owned(),
            },
        ];
        let s = subscriber(ev, 4000);
        let topics = vec!["t".to_owned()];
        let (ps, ss) = (std::slice::from_ref(&p), std::slice::from_ref(&s));
        assert!(liveness(ps, ss, &topics, ms(2500)).is_empty());
        let v = liveness(&[p], &[s], &topics, ms(3500));
        assert_eq!(v.len(), 2, "{v:?}");
    }
}
