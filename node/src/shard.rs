//! A shard: one task owning a slice of the topic space (by hash).
//!
//! It plays two roles for its topics. As **owner** (through [`TopicOwner`])
//! it sequences the topics that the placement ring gives this node, keeps
//! their history and their interest table, and sends each message to every
//! node with interest. As **local delivery** (through [`LocalSubscriptions`])
//! it hands messages to this node's sessions, and keeps the topics' owners
//! (wherever they are) told of this node's interest.
//!
//! Commands arrive on one bounded channel and run to completion one at a
//! time, which is what makes a subscription's `ok`, its replay and the live
//! messages after it come out in order: for a remote owner, its `Subscribed`
//! answer and its later `Deliver`s travel on the same ordered stream and are
//! handled here in that order. A shard never waits on a session (outboxes
//! take pushes or close) nor on a peer (the transport queues or refuses).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::peer::{self, InterestKey, PeerFrame, Refusal, Replayed, TraceContext};
use protocol::{Data, ErrorCode, OkReply, Reply, Topic, TraceParent};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::delivery::{Change, LocalSubscriptions};
use crate::metrics::{Table, METRICS};
use crate::outbox::{SessionHandle, SessionId};
use crate::owner::{NodeId, OwnerLimits, Route, Sequenced, SubKey, TopicOwner};
use crate::ring::Placement;
use crate::telemetry::{self, Hop};
use crate::transport::{Admission, SharedTransport};

/// Request ids carry the shard index in their low bits, so a peer's answer
/// comes back to the shard that asked.
pub const SHARD_BITS: u32 = 8;
pub const MAX_SHARDS: usize = 1 << SHARD_BITS;

/// What a publisher learns once its message is sequenced.
#[derive(Debug, Clone)]
pub struct Acked {
    pub seq: u64,
    pub epoch: Arc<str>,
}

/// The topic's owner could not be reached in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the topic's owner cannot be reached now")]
pub struct Unavailable;

/// Where a publish's acknowledgement goes.
#[derive(Debug)]
pub enum Ack {
    /// An `ok` (or `err`) with the request id, into the publishing session.
    Session { session: SessionHandle, id: u64 },
    /// The HTTP publish handler waiting for the result.
    Http(oneshot::Sender<Result<Acked, Unavailable>>),
}

impl Ack {
    fn acked(self, seq: u64, epoch: &Arc<str>) {
        match self {
            Ack::Session { session, id } => {
                let ok = OkReply {
                    id,
                    seq: Some(seq),
                    epoch: Some(epoch),
                    recovered: None,
                };
                session.push_reply(session.codec.encode_reply(&Reply::Ok(ok)));
            }
            Ack::Http(reply) => {
                let _ = reply.send(Ok(Acked {
                    seq,
                    epoch: epoch.clone(),
                }));
            }
        }
    }

    fn unavailable(self) {
        METRICS.owner_unavailable.inc();
        match self {
            Ack::Session { session, id } => push_unavailable(&session, id),
            Ack::Http(reply) => {
                let _ = reply.send(Err(Unavailable));
            }
        }
    }
}

fn push_unavailable(session: &SessionHandle, id: u64) {
    session.push_reply(session.codec.encode_reply(&Reply::Err {
        id: Some(id),
        code: ErrorCode::Unavailable,
        message: "the topic's owner cannot be reached now; retry",
    }));
}

#[derive(Debug)]
pub struct Publish {
    pub topic: Topic,
    pub data: Data,
    pub trace: Option<TraceParent>,
    pub tracestate: Option<String>,
    pub ack: Option<Ack>,
}

impl Publish {
    /// A message entering the node from a client (a WebSocket `pub` or an
    /// HTTP publish): counted, and given its ingress span, which becomes the
    /// parent of the owner's. The span lasts as long as the caller keeps it.
    pub fn from_client(
        topic: Topic,
        data: Data,
        trace: Option<TraceParent>,
        tracestate: Option<String>,
        ack: Option<Ack>,
    ) -> (Publish, telemetry::MessageSpan) {
        METRICS.messages_in.inc();
        METRICS.bytes_in.add(data.len() as u64);
        let span = telemetry::message_span(
            Hop::Publish,
            trace.as_ref(),
            tracestate.as_deref(),
            topic.as_str(),
        );
        let trace = span.traceparent().or(trace);
        let publish = Publish {
            topic,
            data,
            trace,
            tracestate,
            ack,
        };
        (publish, span)
    }
}

/// A reply that several parts contribute to: the last one to finish sends
/// the session its `ok`. Wildcard subscriptions live on every shard, and in
/// a cluster on every node too.
#[derive(Debug)]
pub struct Completion {
    remaining: AtomicUsize,
    session: SessionHandle,
    id: u64,
    /// The `ok`'s `recovered`: a wildcard `sub` with `since` is never
    /// recovered (history is per topic).
    recovered: Option<bool>,
}

impl Completion {
    pub fn new(
        parts: usize,
        session: SessionHandle,
        id: u64,
        recovered: Option<bool>,
    ) -> Arc<Completion> {
        Arc::new(Completion {
            remaining: AtomicUsize::new(parts),
            session,
            id,
            recovered,
        })
    }

    fn part_done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ok = OkReply {
                id: self.id,
                recovered: self.recovered,
                ..OkReply::default()
            };
            self.session
                .push_reply(self.session.codec.encode_reply(&Reply::Ok(ok)));
        }
    }
}

/// Sends a peer an `InterestAck` once every shard of this node holds a
/// wildcard interest it announced.
pub struct InterestLatch {
    remaining: AtomicUsize,
    to: NodeId,
    req: u64,
    transport: SharedTransport,
}

impl std::fmt::Debug for InterestLatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterestLatch")
            .field("to", &self.to)
            .field("req", &self.req)
            .finish()
    }
}

impl InterestLatch {
    pub fn new(parts: usize, to: NodeId, req: u64, transport: SharedTransport) -> Arc<Self> {
        Arc::new(InterestLatch {
            remaining: AtomicUsize::new(parts),
            to,
            req,
            transport,
        })
    }

    fn part_done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Ok(frame) = peer::encode(&PeerFrame::InterestAck { req: self.req }) {
                let _ = self.transport.send(&self.to, frame);
            }
        }
    }
}

#[derive(Debug)]
pub enum Command {
    /// A client's publish, with its admission in a cluster (see
    /// [`crate::transport::Backlog`]).
    Publish(Publish, Option<Admission>),
    Subscribe {
        session: SessionHandle,
        key: SubKey,
        since: Option<u64>,
        epoch: Option<String>,
        done: Arc<Completion>,
    },
    Unsubscribe {
        session: SessionId,
        key: SubKey,
        done: Option<Arc<Completion>>,
    },
    /// Shard 0 only: tell every other member about a wildcard subscription
    /// of this node (added, or removed when no local session holds it).
    Announce {
        key: SubKey,
        present: bool,
        done: Option<Arc<Completion>>,
    },
    /// A frame from a peer for this shard's topics or requests.
    Remote { from: NodeId, frame: PeerFrame },
    /// A peer's wildcard interest, held by every shard's owner.
    RemoteWildcard {
        from: NodeId,
        key: SubKey,
        present: bool,
        latch: Option<Arc<InterestLatch>>,
    },
    /// The ring changed.
    Placement(Arc<Placement>),
    /// An authenticated connection to a peer is up; `reconnect` when this
    /// node had been connected to the same generation of it before.
    PeerUp { node: NodeId, reconnect: bool },
    /// The connection to a peer ended.
    PeerDown(NodeId),
    /// Answers once the shard has run everything sent before it.
    Health(oneshot::Sender<()>),
    /// Answers with the entries of the shard's tables, by [`Table`].
    Tables(oneshot::Sender<[usize; 3]>),
}

/// What a shard needs to know about its place in the node.
#[derive(Clone)]
pub struct ShardSetup {
    pub node: NodeId,
    pub index: usize,
    pub limits: OwnerLimits,
    /// `None` for a single node: every topic is owned here.
    pub transport: Option<SharedTransport>,
    pub placement: Arc<Placement>,
    pub request_timeout: Duration,
}

/// A publish waiting for a remote owner's answer.
struct PendingPublish {
    topic: Topic,
    data: Data,
    trace: Option<TraceParent>,
    tracestate: Option<String>,
    ack: Ack,
    owner: Option<NodeId>,
    deadline: Instant,
    /// Refused (not sent on, or the owner said it is not the owner): safe
    /// to send again once the ring changes.
    parked: bool,
}

/// An exact subscription waiting for its remote owner's snapshot.
struct PendingSubscribe {
    session: SessionHandle,
    key: SubKey,
    since: Option<u64>,
    epoch: Option<String>,
    id: u64,
    owner: Option<NodeId>,
    deadline: Instant,
    parked: bool,
}

/// A wildcard announcement waiting for every member's `InterestAck`.
struct PendingAnnounce {
    waiting: HashSet<NodeId>,
    done: Arc<Completion>,
    deadline: Instant,
}

pub struct Shard {
    setup: ShardSetup,
    owner: TopicOwner,
    local: LocalSubscriptions,
    commands: mpsc::Receiver<Command>,
    placement: Arc<Placement>,
    next_req: u64,
    publishes: BTreeMap<u64, PendingPublish>,
    subscribes: BTreeMap<u64, PendingSubscribe>,
    announces: BTreeMap<u64, PendingAnnounce>,
    /// This shard's part of `herald_table_entries`, as last reported.
    reported: [i64; 3],
}

/// How often history is aged out and idle topics are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often deadlines of requests to other nodes are checked.
const DEADLINE_INTERVAL: Duration = Duration::from_millis(100);
/// Commands taken per wake-up.
const BATCH: usize = 128;
/// The epoch of a message delivered from another node: `msg` objects do
/// not carry it, and only the owner answers with it.
const REMOTE_EPOCH: &str = "";

impl Shard {
    pub fn new(setup: ShardSetup, commands: mpsc::Receiver<Command>) -> Shard {
        Shard {
            owner: TopicOwner::new(setup.limits.clone()),
            local: LocalSubscriptions::default(),
            commands,
            placement: setup.placement.clone(),
            next_req: 0,
            publishes: BTreeMap::new(),
            subscribes: BTreeMap::new(),
            announces: BTreeMap::new(),
            reported: [0; 3],
            setup,
        }
    }

    /// Runs until every sender is gone.
    pub async fn run(mut self) {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadlines = tokio::time::interval(DEADLINE_INTERVAL);
        deadlines.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                received = self.commands.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        return;
                    }
                    for command in batch.drain(..) {
                        self.handle(command);
                    }
                }
                _ = sweep.tick() => {
                    let interest = self.owner.sweep(Instant::now());
                    self.report_tables(interest);
                }
                _ = deadlines.tick() => self.expire(Instant::now()),
            }
            self.local.wake_sessions();
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            // The admission ends once the publish's frames are queued.
            Command::Publish(publish, _admission) => self.publish(publish),
            Command::Subscribe {
                session,
                key,
                since,
                epoch,
                done,
            } => self.subscribe(session, key, since, epoch, done),
            Command::Unsubscribe { session, key, done } => self.unsubscribe(session, key, done),
            Command::Announce { key, present, done } => self.announce(key, present, done),
            Command::Remote { from, frame } => self.remote(from, frame),
            Command::RemoteWildcard {
                from,
                key,
                present,
                latch,
            } => {
                if present {
                    self.owner.add_interest(&from, &key);
                } else {
                    self.owner.remove_interest(&from, &key);
                }
                if let Some(latch) = latch {
                    latch.part_done();
                }
            }
            Command::Placement(placement) => self.placement_changed(placement),
            Command::PeerUp { node, reconnect } => self.peer_up(&node, reconnect),
            Command::PeerDown(node) => self.peer_down(&node),
            Command::Health(reply) => {
                let _ = reply.send(());
            }
            Command::Tables(reply) => {
                let _ = reply.send(self.table_entries());
            }
        }
    }

    /// Brings this shard's part of `herald_table_entries` up to date, with
    /// the interest the sweep just counted: counted once a second rather
    /// than kept on every change, which would put bookkeeping on the
    /// publish path.
    fn report_tables(&mut self, interest: usize) {
        let now = self.table_entries_with(interest);
        for table in Table::ALL {
            let at = table as usize;
            let count = i64::try_from(now[at]).unwrap_or(i64::MAX);
            METRICS.table_entries[at].add(count - self.reported[at]);
            self.reported[at] = count;
        }
    }

    /// What each [`Table`] holds now.
    fn table_entries(&self) -> [usize; 3] {
        self.table_entries_with(self.owner.interest_entries())
    }

    fn table_entries_with(&self, interest: usize) -> [usize; 3] {
        let pending = self.publishes.len() + self.subscribes.len() + self.announces.len();
        [interest, self.local.entries(), pending]
    }

    fn is_self(&self, node: &str) -> bool {
        *self.setup.node == *node
    }

    /// The owner of `topic`: `None` when no node is placed (a clustered node
    /// that has not joined yet).
    fn owner_of(&self, topic: &str) -> Option<NodeId> {
        if self.setup.transport.is_none() {
            return Some(self.setup.node.clone());
        }
        self.placement.owner(topic).cloned()
    }

    fn new_req(&mut self) -> u64 {
        self.next_req += 1;
        (self.next_req << SHARD_BITS) | self.setup.index as u64
    }

    /// Sends a frame to a peer; false when it could not be queued.
    fn send(&self, to: &NodeId, frame: &PeerFrame) -> bool {
        let Some(transport) = &self.setup.transport else {
            return false;
        };
        match peer::encode(frame) {
            Ok(bytes) => self.send_bytes(transport, to, bytes),
            Err(e) => {
                warn!(error = %e, "peer frame not encodable");
                false
            }
        }
    }

    fn send_bytes(&self, transport: &SharedTransport, to: &NodeId, bytes: Bytes) -> bool {
        match transport.send(to, bytes) {
            Ok(()) => true,
            Err(e) => {
                debug!(peer = %to, error = %e, "frame to peer not sent");
                false
            }
        }
    }

    // ---- publishing ----

    fn publish(&mut self, publish: Publish) {
        match self.owner_of(publish.topic.as_str()) {
            Some(owner) if self.is_self(&owner) => {
                let Publish {
                    topic,
                    data,
                    trace,
                    tracestate,
                    ack,
                } = publish;
                let (message, routes) = self.sequence(topic, data, trace, tracestate);
                if let Some(ack) = ack {
                    ack.acked(message.seq, &message.epoch);
                }
                self.route(&message, routes);
            }
            owner => {
                let Publish {
                    topic,
                    data,
                    trace,
                    tracestate,
                    ack,
                } = publish;
                let Some(ack) = ack else {
                    // Without an id nobody waits: send it once, at most once.
                    let sent = owner.is_some_and(|owner| {
                        self.send(
                            &owner,
                            &PeerFrame::Publish {
                                req: None,
                                topic,
                                data,
                                trace: trace_context(trace.as_ref(), tracestate),
                            },
                        )
                    });
                    if !sent {
                        METRICS.owner_unavailable.inc();
                    }
                    return;
                };
                let req = self.new_req();
                let pending = PendingPublish {
                    topic,
                    data,
                    trace,
                    tracestate,
                    ack,
                    owner,
                    deadline: Instant::now() + self.setup.request_timeout,
                    parked: true,
                };
                self.publishes.insert(req, pending);
                self.send_publish(req);
            }
        }
    }

    /// Sends (or sends again) a pending publish to its topic's current
    /// owner; it stays parked when there is none or it cannot be queued.
    fn send_publish(&mut self, req: u64) {
        let Some(pending) = self.publishes.get(&req) else {
            return;
        };
        let owner = self.owner_of(pending.topic.as_str());
        if owner.as_ref().is_some_and(|o| self.is_self(o)) {
            // The topic moved here while the request waited.
            if let Some(pending) = self.publishes.remove(&req) {
                let (message, routes) = self.sequence(
                    pending.topic,
                    pending.data,
                    pending.trace,
                    pending.tracestate,
                );
                pending.ack.acked(message.seq, &message.epoch);
                self.route(&message, routes);
            }
            return;
        }
        let frame = PeerFrame::Publish {
            req: Some(req),
            topic: pending.topic.clone(),
            data: pending.data.clone(),
            trace: trace_context(pending.trace.as_ref(), pending.tracestate.clone()),
        };
        let sent = owner.as_ref().is_some_and(|o| self.send(o, &frame));
        if let Some(pending) = self.publishes.get_mut(&req) {
            pending.owner = owner;
            pending.parked = !sent;
        }
    }

    /// The owner's hop: sequences a message under its `herald.sequence`
    /// span, which becomes the parent of every delivery.
    fn sequence(
        &mut self,
        topic: Topic,
        data: Data,
        trace: Option<TraceParent>,
        tracestate: Option<String>,
    ) -> (Arc<Sequenced>, Vec<Route>) {
        let span = telemetry::message_span(
            Hop::Sequence,
            trace.as_ref(),
            tracestate.as_deref(),
            topic.as_str(),
        );
        let trace = span.traceparent().or(trace);
        let (message, routes) = self
            .owner
            .publish(topic, data, trace, tracestate, Instant::now());
        span.record_seq(message.seq);
        (message, routes)
    }

    /// This node's delivery hop: hands `message` to local sessions under a
    /// `herald.deliver` span, which the `msg`s carry as their parent.
    fn deliver_here(&mut self, message: &Sequenced, groups: &[SubKey]) {
        METRICS
            .delivery_latency
            .observe_micros(crate::metrics::now_micros().saturating_sub(message.sequenced_at_us));
        if !telemetry::enabled() {
            self.local.deliver(message, groups);
            return;
        }
        let span = telemetry::message_span(
            Hop::Deliver,
            message.trace.as_ref(),
            message.tracestate.as_deref(),
            message.topic.as_str(),
        );
        span.record_seq(message.seq);
        let _entered = span.span().map(|s| s.enter());
        // The msg's trace names this hop's span, so it is a message of its
        // own (history keeps the owner's).
        let traced = Sequenced::new(
            message.topic.clone(),
            message.seq,
            message.epoch.clone(),
            message.data.clone(),
            span.traceparent().or(message.trace),
            message.tracestate.clone(),
        )
        .sequenced_at(message.sequenced_at_us);
        self.local.deliver(&traced, groups);
    }

    /// Hands a sequenced message to local sessions and to every other node
    /// with interest.
    fn route(&mut self, message: &Arc<Sequenced>, routes: Vec<Route>) {
        // Most routes serve no group: their frame is the same, encode it once.
        let mut plain_frame: Option<Bytes> = None;
        for route in routes {
            if self.is_self(&route.node) {
                self.deliver_here(message, &route.groups);
                continue;
            }
            let Some(transport) = self.setup.transport.clone() else {
                continue;
            };
            let frame = if route.groups.is_empty() {
                if plain_frame.is_none() {
                    plain_frame = encode_deliver(message, Vec::new());
                }
                plain_frame.clone()
            } else {
                encode_deliver(message, route.groups)
            };
            if let Some(frame) = frame {
                if !self.send_bytes(&transport, &route.node, frame) {
                    METRICS.peer_frames_dropped.inc();
                }
            }
        }
    }

    // ---- subscribing ----

    fn subscribe(
        &mut self,
        session: SessionHandle,
        key: SubKey,
        since: Option<u64>,
        epoch: Option<String>,
        done: Arc<Completion>,
    ) {
        let Some(topic) = key.pattern.as_topic() else {
            // A wildcard lives on every shard (and is announced to every
            // node by shard 0); it has no history to replay, so `since` on
            // one is never recovered.
            if self.local.add(&key, session) == Change::First {
                self.owner.add_interest(&self.setup.node, &key);
            }
            done.part_done();
            return;
        };
        match self.owner_of(topic.as_str()) {
            Some(owner) if self.is_self(&owner) => {
                let change = self.local.add(&key, session.clone());
                self.owner.add_interest(&self.setup.node, &key);
                let snapshot = self.owner.snapshot(&topic, since, epoch.as_deref());
                let (recovered, replay) = if change == Change::Unchanged {
                    // Already subscribed: the subscription never stopped,
                    // and replaying would repeat messages it delivered.
                    (since.map(|_| false), Vec::new())
                } else {
                    (snapshot.recovered, snapshot.replay)
                };
                push_sub_ok(&session, done.id, snapshot.seq, &snapshot.epoch, recovered);
                for message in replay {
                    push_message(&session, &message);
                }
            }
            owner => {
                let req = self.new_req();
                self.subscribes.insert(
                    req,
                    PendingSubscribe {
                        session,
                        key,
                        since,
                        epoch,
                        id: done.id,
                        owner,
                        deadline: Instant::now() + self.setup.request_timeout,
                        parked: true,
                    },
                );
                self.send_subscribe(req);
            }
        }
    }

    fn send_subscribe(&mut self, req: u64) {
        let Some(pending) = self.subscribes.get(&req) else {
            return;
        };
        let Some(topic) = pending.key.pattern.as_topic() else {
            return;
        };
        let owner = self.owner_of(topic.as_str());
        if owner.as_ref().is_some_and(|o| self.is_self(o)) {
            // The topic moved here while the request waited.
            if let Some(p) = self.subscribes.remove(&req) {
                let done = Completion::new(1, p.session.clone(), p.id, None);
                self.subscribe(p.session, p.key, p.since, p.epoch, done);
            }
            return;
        }
        let frame = PeerFrame::Subscribe {
            req,
            key: pending.key.clone(),
            since: pending.since,
            epoch: pending.epoch.clone(),
        };
        let sent = owner.as_ref().is_some_and(|o| self.send(o, &frame));
        if let Some(pending) = self.subscribes.get_mut(&req) {
            pending.owner = owner;
            pending.parked = !sent;
        }
    }

    /// The remote owner's snapshot for a pending subscription: from here on
    /// the session gets every message of the topic that arrives.
    fn subscribed(
        &mut self,
        req: u64,
        seq: u64,
        epoch: String,
        recovered: Option<bool>,
        replay: Vec<Replayed>,
    ) {
        let Some(pending) = self.subscribes.remove(&req) else {
            return;
        };
        let Some(topic) = pending.key.pattern.as_topic() else {
            return;
        };
        if pending.session.is_closed() {
            self.drop_interest_if_unused(&pending.key);
            return;
        }
        let change = self.local.add(&pending.key, pending.session.clone());
        let epoch: Arc<str> = Arc::from(epoch);
        let (recovered, replay) = if change == Change::Unchanged {
            (pending.since.map(|_| false), Vec::new())
        } else {
            (recovered, replay)
        };
        push_sub_ok(&pending.session, pending.id, seq, &epoch, recovered);
        for replayed in replay {
            let message = Sequenced::new(
                topic.clone(),
                replayed.seq,
                epoch.clone(),
                replayed.data,
                replayed
                    .trace
                    .traceparent
                    .as_deref()
                    .and_then(TraceParent::parse),
                replayed.trace.tracestate,
            );
            push_message(&pending.session, &message);
        }
    }

    fn unsubscribe(&mut self, session: SessionId, key: SubKey, done: Option<Arc<Completion>>) {
        // A subscription still waiting for its owner is withdrawn too. Its
        // `Subscribe` may already have reached the owner, which then holds
        // this node's interest: that must be taken back like a last
        // subscriber's, or the owner forwards the topic here for good.
        let pending_before = self.subscribes.len();
        self.subscribes
            .retain(|_, p| !(p.session.id == session && p.key == key));
        let withdrawn = self.subscribes.len() < pending_before;
        let last = self.local.remove(&key, session) == Change::Last;
        match key.pattern.as_topic() {
            None if last => self.owner.remove_interest(&self.setup.node, &key),
            Some(_) if last || withdrawn => self.drop_interest_if_unused(&key),
            _ => {}
        }
        if let Some(done) = done {
            done.part_done();
        }
    }

    /// Tells the owner of an exact topic that this node no longer has
    /// subscribers for `key`, unless one is still held or on its way.
    fn drop_interest_if_unused(&mut self, key: &SubKey) {
        if self.local.holds(key) || self.subscribes.values().any(|p| p.key == *key) {
            return;
        }
        let Some(topic) = key.pattern.as_topic() else {
            return;
        };
        match self.owner_of(topic.as_str()) {
            Some(owner) if self.is_self(&owner) => {
                self.owner.remove_interest(&self.setup.node, key)
            }
            Some(owner) => {
                self.send(
                    &owner,
                    &PeerFrame::Interest {
                        req: None,
                        key: key.clone(),
                        present: false,
                    },
                );
            }
            None => {}
        }
    }

    /// Shard 0: a wildcard subscription of this node, told to every member.
    fn announce(&mut self, key: SubKey, present: bool, done: Option<Arc<Completion>>) {
        if !present && self.local.holds(&key) {
            // Another session here still holds it.
            if let Some(done) = done {
                done.part_done();
            }
            return;
        }
        // One request id for the whole announcement: acks are matched by
        // the node they come from.
        let req = done.as_ref().map(|_| self.new_req());
        let mut waiting = HashSet::new();
        let frame = PeerFrame::Interest { req, key, present };
        for member in self.placement.members().to_vec() {
            if !self.is_self(&member) && self.send(&member, &frame) {
                waiting.insert(member);
            }
        }
        let (Some(done), Some(req)) = (done, req) else {
            return;
        };
        if waiting.is_empty() {
            done.part_done();
            return;
        }
        self.announces.insert(
            req,
            PendingAnnounce {
                waiting,
                done,
                deadline: Instant::now() + self.setup.request_timeout,
            },
        );
    }

    // ---- frames from peers ----

    fn remote(&mut self, from: NodeId, frame: PeerFrame) {
        match frame {
            PeerFrame::Publish {
                req,
                topic,
                data,
                trace,
            } => {
                if !self.placement.owns(&self.setup.node, topic.as_str()) {
                    if let Some(req) = req {
                        self.send(
                            &from,
                            &PeerFrame::Refused {
                                req,
                                why: Refusal::NotOwner,
                            },
                        );
                    }
                    return;
                }
                let parent = trace.traceparent.as_deref().and_then(TraceParent::parse);
                let (message, routes) = self.sequence(topic, data, parent, trace.tracestate);
                if let Some(req) = req {
                    self.send(
                        &from,
                        &PeerFrame::Published {
                            req,
                            seq: message.seq,
                            epoch: message.epoch.to_string(),
                        },
                    );
                }
                self.route(&message, routes);
            }
            PeerFrame::Published { req, seq, epoch } => {
                if let Some(pending) = self.publishes.remove(&req) {
                    pending.ack.acked(seq, &Arc::from(epoch));
                }
            }
            PeerFrame::Refused { req, why } => {
                if let Some(pending) = self.publishes.get_mut(&req) {
                    match why {
                        Refusal::NotOwner => pending.parked = true,
                        Refusal::Stopping => {
                            if let Some(pending) = self.publishes.remove(&req) {
                                pending.ack.unavailable();
                            }
                        }
                    }
                } else if let Some(pending) = self.subscribes.get_mut(&req) {
                    pending.parked = true;
                }
            }
            PeerFrame::Deliver {
                topic,
                seq,
                data,
                trace,
                groups,
                sequenced_at_us,
            } => {
                let message = Sequenced::new(
                    topic,
                    seq,
                    Arc::from(REMOTE_EPOCH),
                    data,
                    trace.traceparent.as_deref().and_then(TraceParent::parse),
                    trace.tracestate,
                )
                .sequenced_at(sequenced_at_us);
                self.deliver_here(&message, &groups);
            }
            PeerFrame::Subscribe {
                req,
                key,
                since,
                epoch,
            } => {
                let Some(topic) = key.pattern.as_topic() else {
                    return;
                };
                if !self.placement.owns(&self.setup.node, topic.as_str()) {
                    self.send(
                        &from,
                        &PeerFrame::Refused {
                            req,
                            why: Refusal::NotOwner,
                        },
                    );
                    return;
                }
                self.owner.add_interest(&from, &key);
                let snapshot = self.owner.snapshot(&topic, since, epoch.as_deref());
                let replay = snapshot
                    .replay
                    .iter()
                    .map(|m| Replayed {
                        seq: m.seq,
                        data: m.data.clone(),
                        trace: trace_context(m.trace.as_ref(), m.tracestate.clone()),
                    })
                    .collect();
                self.send(
                    &from,
                    &PeerFrame::Subscribed {
                        req,
                        seq: snapshot.seq,
                        epoch: snapshot.epoch.to_string(),
                        recovered: snapshot.recovered,
                        replay,
                    },
                );
            }
            PeerFrame::Subscribed {
                req,
                seq,
                epoch,
                recovered,
                replay,
            } => self.subscribed(req, seq, epoch, recovered, replay),
            PeerFrame::Interest { req, key, present } => {
                // Exact topics only here (wildcards come as RemoteWildcard).
                // Kept even when this node's ring does not give it the
                // topic yet: the sender's ring may have changed first, and it
                // will not send again. A topic this node does not end up
                // owning is dropped at the next ring change.
                if present {
                    // Messages this owner sequenced before it heard of the
                    // node's subscribers go first, on the same ordered
                    // stream as every later one.
                    for message in self.owner.rejoin_interest(&from, &key) {
                        let route = Route {
                            node: from.clone(),
                            groups: Vec::new(),
                        };
                        self.route(&message, vec![route]);
                    }
                } else {
                    self.owner.remove_interest(&from, &key);
                }
                if let Some(req) = req {
                    self.send(&from, &PeerFrame::InterestAck { req });
                }
            }
            PeerFrame::InterestAck { req } => {
                if let Some(pending) = self.announces.get_mut(&req) {
                    pending.waiting.remove(&from);
                    if pending.waiting.is_empty() {
                        if let Some(pending) = self.announces.remove(&req) {
                            pending.done.part_done();
                        }
                    }
                }
            }
        }
    }

    // ---- membership ----

    fn placement_changed(&mut self, placement: Arc<Placement>) {
        let old = std::mem::replace(&mut self.placement, placement);
        let me = self.setup.node.clone();
        let new = self.placement.clone();
        // Topics that moved away start a new epoch at their new owner.
        self.owner
            .retain_topics(|topic| new.owns(&me, topic.as_str()));
        // Tell new owners of this node's exact interest.
        for key in self.local.exact_keys() {
            let Some(topic) = key.pattern.as_topic() else {
                continue;
            };
            let (before, after) = (old.owner(topic.as_str()), new.owner(topic.as_str()));
            if before == after && !old.is_empty() {
                continue;
            }
            match after {
                Some(owner) if *owner == me => self.owner.add_interest(&me, &key),
                Some(owner) => {
                    self.send(
                        owner,
                        &PeerFrame::Interest {
                            req: None,
                            key,
                            present: true,
                        },
                    );
                }
                None => {}
            }
        }
        // Requests refused or not sent for want of an owner go out again.
        self.retry_parked();
    }

    fn peer_up(&mut self, node: &NodeId, reconnect: bool) {
        if reconnect {
            self.owner.new_epochs();
        }
        // The peer may have forgotten this node's interest (its connection
        // broke, or it restarted): register everything it owns again.
        for key in self.local.exact_keys() {
            let Some(topic) = key.pattern.as_topic() else {
                continue;
            };
            if self.placement.owner(topic.as_str()) == Some(node) {
                self.send(
                    node,
                    &PeerFrame::Interest {
                        req: None,
                        key,
                        present: true,
                    },
                );
            }
        }
        if self.setup.index == 0 {
            for key in self.local.wildcard_keys() {
                self.send(
                    node,
                    &PeerFrame::Interest {
                        req: None,
                        key,
                        present: true,
                    },
                );
            }
        }
    }

    fn peer_down(&mut self, node: &NodeId) {
        self.owner.forget_node(node);
        // A publish in flight to it may or may not have been sequenced:
        // sending it again could deliver it twice, so it fails now.
        let lost = remove_where(&mut self.publishes, |p| {
            !p.parked && p.owner.as_ref() == Some(node)
        });
        for pending in lost {
            pending.ack.unavailable();
        }
        // A subscription is safe to ask for again.
        for pending in self.subscribes.values_mut() {
            if pending.owner.as_ref() == Some(node) {
                pending.parked = true;
            }
        }
        for pending in self.announces.values_mut() {
            pending.waiting.remove(node);
        }
        for pending in remove_where(&mut self.announces, |p| p.waiting.is_empty()) {
            pending.done.part_done();
        }
    }

    /// Sends parked requests again: an owner that refused (its ring was
    /// behind) may take them now, without waiting for this node's ring to
    /// change again.
    fn retry_parked(&mut self) {
        for req in reqs_where(&self.publishes, |p| p.parked) {
            self.send_publish(req);
        }
        for req in reqs_where(&self.subscribes, |p| p.parked) {
            self.send_subscribe(req);
        }
    }

    fn expire(&mut self, now: Instant) {
        self.retry_parked();
        for pending in remove_where(&mut self.publishes, |p| p.deadline <= now) {
            pending.ack.unavailable();
        }
        for pending in remove_where(&mut self.subscribes, |p| p.deadline <= now) {
            METRICS.owner_unavailable.inc();
            push_unavailable(&pending.session, pending.id);
            self.drop_interest_if_unused(&pending.key);
        }
        // A member that never acknowledged a wildcard gets it again when it
        // reconnects (peer_up); the subscriber is not held up longer.
        for pending in remove_where(&mut self.announces, |p| p.deadline <= now) {
            pending.done.part_done();
        }
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        for table in Table::ALL {
            METRICS.table_entries[table as usize].add(-self.reported[table as usize]);
        }
    }
}

/// The ids of the pending requests `pick` selects, in request order.
fn reqs_where<V>(pending: &BTreeMap<u64, V>, pick: impl Fn(&V) -> bool) -> Vec<u64> {
    pending
        .iter()
        .filter(|(_, v)| pick(v))
        .map(|(req, _)| *req)
        .collect()
}

/// Removes and returns the pending requests `pick` selects, in request
/// order.
fn remove_where<V>(pending: &mut BTreeMap<u64, V>, pick: impl Fn(&V) -> bool) -> Vec<V> {
    reqs_where(pending, pick)
        .into_iter()
        .filter_map(|req| pending.remove(&req))
        .collect()
}

fn trace_context(trace: Option<&TraceParent>, tracestate: Option<String>) -> TraceContext {
    TraceContext {
        traceparent: trace.map(|t| t.to_string()),
        tracestate,
    }
}

fn encode_deliver(message: &Sequenced, groups: Vec<InterestKey>) -> Option<Bytes> {
    let frame = PeerFrame::Deliver {
        topic: message.topic.clone(),
        seq: message.seq,
        data: message.data.clone(),
        trace: trace_context(message.trace.as_ref(), message.tracestate.clone()),
        groups,
        sequenced_at_us: message.sequenced_at_us,
    };
    match peer::encode(&frame) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            warn!(error = %e, "deliver frame not encodable");
            None
        }
    }
}

fn push_sub_ok(
    session: &SessionHandle,
    id: u64,
    seq: u64,
    epoch: &Arc<str>,
    recovered: Option<bool>,
) {
    let ok = OkReply {
        id,
        seq: Some(seq),
        epoch: Some(epoch),
        recovered,
    };
    session.push_reply(session.codec.encode_reply(&Reply::Ok(ok)));
}

fn push_message(session: &SessionHandle, message: &Sequenced) {
    if session.push(message.encoded(session.codec).clone()) == crate::outbox::Pushed::Queued {
        METRICS.messages_out.inc();
    }
}
